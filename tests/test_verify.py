"""Verification after every pass: checker + strict shape inference, fidelity numbers, accuracy, and the pass
manager keeping the last good model when a pass raises or produces an invalid model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import graphs
import squeeze
from squeeze import verify
from squeeze.data import input_specs, resolve_shapes
from squeeze.errors import PassError
from squeeze.pipeline import run_pipeline
from squeeze.registry import get_pass
from squeeze.spec import bind


# ------------------------------------------------------------------------------------------------- structure

def test_valid_model_passes_check_structure():
    for build in graphs.LOSSLESS.values():
        verify.check_structure(build())


def test_checker_failure_is_a_pass_error():
    with pytest.raises(PassError, match="^model fails the ONNX checker: ") as info:
        verify.check_structure(graphs.fails_checker())
    assert "\n" not in str(info.value)


def test_strict_shape_inference_failure_is_a_pass_error():
    """Add of [1,4] and [1,3] passes the plain checker's schema checks, not strict shape inference."""
    model = graphs.two_inputs()
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.checker.check_model(model)
    with pytest.raises(PassError, match="fails the ONNX checker: .*Incompatible dimensions"):
        verify.check_structure(model)


# ------------------------------------------------------------------------------------------------- fidelity

def test_fidelity_numbers():
    ref = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    new = {"y": np.array([[1.0, 2.5], [3.0, 2.9]], np.float32)}
    fid = verify.fidelity(ref, new)
    assert fid["max_abs"] == pytest.approx(1.1, abs=1e-6)
    assert fid["max_abs_rel"] == pytest.approx(1.1 / 4.0, abs=1e-6)
    assert fid["rel_l2"] == pytest.approx(np.sqrt(0.5 ** 2 + 1.1 ** 2) / np.sqrt(30.0), rel=1e-6)
    assert fid["top1_agreement"] == 0.5  # row 0 agrees (1 = 1), row 1 does not (1 vs 0)
    assert fid["outputs"]["y"]["scale"] == 4.0


def test_fidelity_of_identical_outputs_is_exact():
    ref = {"y": np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)}
    fid = verify.fidelity(ref, {"y": ref["y"].copy()})
    assert (fid["max_abs"], fid["rel_l2"], fid["max_abs_rel"], fid["top1_agreement"]) == (0.0, 0.0, 0.0, 1.0)


def test_fidelity_takes_the_worst_output_and_flags_problems():
    ref = {"a": np.ones((2, 3), np.float32), "b": np.full((2, 1, 4, 4), 10.0, np.float32),
           "c": np.zeros((2, 2), np.float32)}
    new = {"a": np.array([[1, 1, 1], [1, 1, 1.5]], np.float32), "b": np.full((2, 1, 4, 4), 10.2, np.float32),
           "c": np.zeros((2, 3), np.float32)}
    fid = verify.fidelity(ref, new)
    assert fid["max_abs"] == pytest.approx(0.5)
    assert fid["max_abs_rel"] == pytest.approx(0.5)
    assert fid["outputs"]["b"]["max_abs_rel"] == pytest.approx(0.02, rel=1e-5)
    assert "top1_agreement" not in fid["outputs"]["b"]  # [N,1,4,4] is a map, not class scores
    assert fid["shape_mismatch"] is True and fid["outputs"]["c"] == {"shape_mismatch": [[2, 2], [2, 3]]}
    nan = {"a": np.array([[1, np.nan, 1], [1, 1, np.inf]], np.float32)}
    assert verify.fidelity({"a": ref["a"]}, nan)["outputs"]["a"]["non_finite"] == 2


def test_accuracy_from_labels():
    scores = {"logits": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)}
    acc = verify.accuracy(scores, np.array([1, 0, 0, 0]))
    assert (acc["top1"], acc["n"], acc["output"]) == (0.75, 4, "logits")
    assert acc["correct"].tolist() == [True, True, False, True]
    assert verify.accuracy({"map": np.zeros((4, 1, 3, 3), np.float32)}, np.zeros(4, np.int64)) is None


def test_looks_like_scores():
    assert verify.looks_like_scores(np.zeros((3, 10), np.float32))
    assert verify.looks_like_scores(np.zeros((3, 1000, 1, 1), np.float32))
    assert not verify.looks_like_scores(np.zeros((3, 1), np.float32))
    assert not verify.looks_like_scores(np.zeros((3, 4, 2, 2), np.float32))
    assert not verify.looks_like_scores(np.zeros((3, 10), np.int64))


# ------------------------------------------------------------------------------------------------- the pass manager

def _run(model, spec, data=None):
    data = data or graphs.random_inputs(model, count=4)
    return run_pipeline(model, bind(spec, get_pass), data, resolve_shapes(input_specs(model), {}, data))


@pytest.fixture
def broken_passes(temp_pass):
    """Three deliberately broken passes, registered for the test only."""
    @temp_pass("test-verify-raises")
    def raises(graph: gs.Graph, ctx) -> None:
        """Raises a plain exception, like a bug would."""
        ctx.note("about to fail")
        raise RuntimeError("boom\nsecond line")

    @temp_pass("test-verify-invalid")
    def invalid(graph: gs.Graph, ctx) -> None:
        """Produces a model the checker rejects (an op that does not exist)."""
        out = graph.outputs[0]
        bad = gs.Variable("bad", dtype=np.float32)
        graph.nodes.append(gs.Node("NoSuchOp", inputs=[out], outputs=[bad]))
        graph.outputs = [bad]

    @temp_pass("test-verify-user-error")
    def user_error(graph: gs.Graph, ctx) -> None:
        """Refuses with a SqueezeError."""
        raise PassError("nothing to do on this model")

    @temp_pass("test-verify-mutates")
    def mutates(graph: gs.Graph, ctx) -> None:
        """Edits its graph copy in place (halves the first Conv's weights), then fails."""
        conv = next(n for n in graph.nodes if n.op == "Conv")
        conv.inputs[1].values *= 0.5
        raise RuntimeError("after editing")


@pytest.mark.parametrize("spec, failure", [
    ("test-verify-raises", "pass 'test-verify-raises' failed with RuntimeError: boom"),
    ("test-verify-invalid", "pass 'test-verify-invalid' failed: model fails the ONNX checker: "),
    ("test-verify-user-error", "pass 'test-verify-user-error' failed: nothing to do on this model"),
    ("test-verify-mutates", "pass 'test-verify-mutates' failed with RuntimeError: after editing"),
])
def test_failing_pass_keeps_the_last_good_model(broken_passes, spec, failure):
    model = graphs.conv_bn_relu()
    original_bytes = model.SerializeToString()
    result = _run(model, f"fold-bn,{spec},cleanup")
    assert result.failure.startswith(failure) and "\n" not in result.failure
    # fold-bn ran and verified; the broken pass stopped the pipeline; cleanup never ran
    assert [s["name"] for s in result.steps] == ["fold-bn", spec]
    assert "failed" not in result.steps[0] and result.steps[1]["failed"] == result.failure
    assert graphs.op_counts(result.model) == {"Conv": 1, "Relu": 1}  # the model fold-bn produced
    onnx.checker.check_model(result.model, full_check=True)
    assert graphs.max_rel_error(model, result.model, graphs.random_inputs(model)) <= 1e-5
    assert model.SerializeToString() == original_bytes  # the input model was never touched


def test_the_exception_of_a_buggy_pass_is_kept_for_debug(broken_passes):
    result = _run(graphs.conv_bn_relu(), "test-verify-raises")
    assert isinstance(result.exception, RuntimeError)
    assert "in pass 'test-verify-raises'" in result.exception.__notes__
    assert result.steps[0]["notes"] == ["about to fail"]
    assert graphs.op_counts(result.model)["BatchNormalization"] == 1  # nothing ran: the original is the last good


def test_failed_pass_in_compress_saves_the_last_good_model(broken_passes, tmp_path):
    result = squeeze.compress(graphs.conv_bn_relu(), "fold-bn,test-verify-invalid", targets="",
                              out_dir=tmp_path / "out", runs=3)
    assert not result.ok and result.failure.startswith("pass 'test-verify-invalid' failed")
    saved = onnx.load(tmp_path / "out" / "model.onnx")
    assert graphs.op_counts(saved) == {"Conv": 1, "Relu": 1}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["failure"] == result.failure
    assert report["passes"][1]["failed"] == result.failure
    assert report["final"]["nodes"] == 2
    assert "Pipeline stopped" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(PassError, match="^pass 'test-verify-invalid' failed: model fails the ONNX checker"):
        result.raise_for_failure()


def test_each_step_records_what_it_did():
    model = graphs.identity_dropout_chain()
    result = _run(model, "cleanup,fold-bn")
    assert result.failure is None
    cleanup, fold = result.steps
    assert (cleanup["name"], cleanup["spec"], cleanup["params"]) == ("cleanup", "cleanup",
                                                                       {"fold_constants": True, "max_folded_mb": 16.0})
    assert cleanup["nodes"] == 2 and cleanup["ops"] == {"Conv": 1, "Relu": 1}
    assert cleanup["param_count"] == metrics_params(model)
    assert cleanup["fidelity"]["max_abs"] == 0.0 and cleanup["fidelity_vs_original"]["max_abs"] == 0.0
    assert cleanup["notes"] == ["removed 3 Identity node(s)", "removed 2 Dropout node(s)"]
    assert cleanup["details"] == {"nodes": {"before": 7, "after": 2}}
    assert cleanup["seconds"] >= 0 and cleanup["bytes"]["onnx"] > 0
    assert fold["notes"] == ["no BatchNormalization nodes in the model"]


def metrics_params(model) -> int:
    from squeeze.metrics import count_params
    return count_params(model)
