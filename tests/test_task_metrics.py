"""Task metrics (squeeze/task_metrics.py): each metric on hand-made arrays, occlusion saliency on a linear model
whose answer is known, --metric parsing, and the corpus baselines of MANIFEST §7 (skipped without the corpus)."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import squeeze
from squeeze import cli, verify
from squeeze.data import Dataset
from squeeze import task_metrics as tm
from squeeze.task_metrics import Evaluated, MetricError, Score

from conftest import REPO


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(MetricError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def _score(metric: tm.Metric, outputs: dict, data: Dataset, original: dict | None = None) -> Score:
    ref = Evaluated(None, original if original is not None else outputs)
    return metric.compute(Evaluated(None, outputs), ref, data)


# ------------------------------------------------------------------------------------------------- CTC

def test_ctc_greedy_decode_collapses_repeats_then_drops_blanks():
    assert tm.ctc_greedy_decode([0, 1, 1, 0, 1, 2, 2, 0, 0, 3]) == [1, 1, 2, 3]  # a blank separates two 1s
    assert tm.ctc_greedy_decode([2, 2, 2]) == [2]
    assert tm.ctc_greedy_decode([0, 0, 0]) == []
    assert tm.ctc_greedy_decode([]) == []


@pytest.mark.parametrize("a, b, distance", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3),
                                            ("flaw", "lawn", 2), ("same", "same", 0), ("ab", "ba", 2)])
def test_edit_distance(a, b, distance):
    assert tm.edit_distance(a, b) == distance == tm.edit_distance(b, a)


def test_char_accuracy():
    assert tm.char_accuracy("abcd", "abcd") == 1.0
    assert tm.char_accuracy("abd", "abcd") == 0.75
    assert tm.char_accuracy("", "") == 1.0 and tm.char_accuracy("x", "") == 0.0
    assert tm.char_accuracy("abcdefgh", "ab") == -2.0  # 6 insertions on a 2-character truth


def _one_hot(steps: list[int], classes: int) -> np.ndarray:
    out = np.full((len(steps), classes), -5.0, np.float32)
    out[np.arange(len(steps)), steps] = 5.0
    return out


def test_ctc_metric_on_hand_made_outputs(tmp_path):
    """dict a,b,c (CRLF lines) → classes: 0 blank, 1 a, 2 b, 3 c, 4 space."""
    (tmp_path / "dict.txt").write_bytes(b"a\r\nb\r\nc\r\n")
    metric = tm.parse_metric(f"ctc:{tmp_path / 'dict.txt'}")
    assert (metric.name, metric.higher_is_better, metric.percent, metric.needs) == ("ctc", True, True, "texts")
    probs = np.stack([_one_hot([1, 1, 0, 2, 0, 0], 5),            # "ab"
                      _one_hot([3, 4, 4, 0, 2, 2], 5)])           # "c b"   (truth "c a": one substitution)
    data = Dataset({"x": np.zeros((2, 1), np.float32)}, texts=np.array(["ab", "c a"]))
    score = _score(metric, {"y": probs}, data)
    assert score.value == pytest.approx(1 - 1 / 5)  # 1 − Σ edits / Σ truth characters
    assert score.n == 2 and score.samples.tolist() == pytest.approx([1.0, 2 / 3])
    assert score.weights.tolist() == [2.0, 3.0]
    # ratio-estimator standard error: √(n/(n−1) · Σ w²(x − v)²) / Σw
    expected = math.sqrt(2 * (4 * 0.2 ** 2 + 9 * (2 / 3 - 0.8) ** 2)) / 5
    assert score.stderr == pytest.approx(expected)


def test_ctc_without_a_space_class_and_from_a_paddle_yml(tmp_path):
    (tmp_path / "inference.yml").write_text("PostProcess:\n  name: CTCLabelDecode\n  character_dict:\n"
                                            "  - a\n  - b\n")
    metric = tm.parse_metric("ctc", model_path=tmp_path / "model.onnx")  # found beside the model
    probs = _one_hot([1, 0, 1, 2], 3)[None]  # 3 classes = blank + a + b: no space class
    score = _score(metric, {"y": probs}, Dataset({"x": np.zeros((1, 1), np.float32)}, texts=np.array(["aab"])))
    assert score.value == pytest.approx(1.0)


def test_ctc_errors_are_one_line(tmp_path):
    assert "dictionary missing.txt not found" in _error(tm.parse_metric, "ctc:missing.txt")
    assert "ctc needs a dictionary" in _error(tm.parse_metric, "ctc", model_path=tmp_path / "m.onnx")
    (tmp_path / "d.txt").write_text("a\nb\n")
    metric = tm.parse_metric(f"ctc:{tmp_path / 'd.txt'}")
    data = Dataset({"x": np.zeros((1, 1), np.float32)}, texts=np.array(["a"]))
    message = _error(_score, metric, {"y": np.zeros((1, 4, 7), np.float32)}, data)
    assert "has 7 classes per step, but d.txt has 2 characters (expected 4" in message
    assert "no output of shape [N, T, classes]" in _error(_score, metric, {"y": np.zeros((1, 7), np.float32)}, data)


# ------------------------------------------------------------------------------------------------- mask IoU

def test_mask_iou_per_sample():
    pred = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 1]]], bool)
    masks = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 1]]], np.uint8)
    assert tm.mask_iou(pred, masks).tolist() == pytest.approx([1 / 3, 1.0, 1.0])  # empty ∪ empty counts as 1


def test_mask_iou_metric_thresholds_the_map_and_matches_masks_shape():
    maps = np.array([[0.1, 0.3], [0.25, 0.9]], np.float32).reshape(1, 1, 2, 2)  # [N, 1, H, W] like a DB head
    masks = np.array([[[0, 1], [1, 1]]], np.uint8)
    data = Dataset({"x": np.zeros((1, 1), np.float32)}, masks=masks)
    assert _score(tm.parse_metric("mask-iou:0.2"), {"p": maps}, data).value == pytest.approx(1.0)
    assert _score(tm.parse_metric("mask-iou"), {"p": maps}, data).value == pytest.approx(1 / 3)  # default 0.5
    metric = tm.parse_metric("mask-iou:0.2")
    assert metric.drop(Score(0.48, 32, None), Score(0.45, 32, None)) == pytest.approx(0.03)  # absolute units
    assert "no output has maps of the masks' shape [3, 3]" in _error(
        _score, metric, {"p": maps}, Dataset({"x": np.zeros((1, 1), np.float32)}, masks=np.zeros((1, 3, 3))))


# ------------------------------------------------------------------------------------------------- fidelity

def test_agreement_and_rel_l2_against_the_original():
    ref = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 5], [2, 3, 1]], np.float32)
    new = np.array([[3, 1, 0], [2, 1, 1], [1, 0, 5], [2, 3, 1]], np.float32)  # sample 1 flips its argmax
    data = Dataset({"x": np.zeros((4, 1), np.float32)})
    agreement = tm.parse_metric("agreement")
    score = _score(agreement, {"y": new}, data, original={"y": ref})
    assert score.value == 0.75 and score.n == 4
    assert agreement.drop(Score(1.0, 4, 0.0), score) == pytest.approx(25.0)  # points
    rel = _score(tm.parse_metric("rel-l2"), {"y": new}, data, original={"y": ref})
    assert rel.value == pytest.approx(verify.fidelity({"y": ref}, {"y": new})["rel_l2"])
    assert tm.parse_metric("rel-l2").drop(Score(0.0, 4, None), rel) == pytest.approx(100 * rel.value)  # lower = better
    assert "use --metric rel-l2" in _error(_score, agreement, {"y": np.zeros((4, 3, 2), np.float32)}, data)


def test_weighted_mean_score_reduces_to_the_plain_standard_error():
    values = np.array([0.2, 0.4, 0.9, 0.5])
    plain, weighted = tm.mean_score(values), tm.mean_score(values, np.ones(4))
    assert plain.stderr == pytest.approx(np.std(values, ddof=1) / 2) == pytest.approx(weighted.stderr)
    assert tm.mean_score(np.array([1.0])).stderr is None


def test_drop_stderr_is_paired_over_the_same_samples():
    metric = tm.parse_metric("top1")
    before = tm.mean_score(np.array([1, 1, 0, 1, 1, 0, 1, 1.0]))
    after = tm.mean_score(np.array([1, 0, 0, 1, 1, 0, 1, 1.0]))
    assert metric.drop(before, after) == pytest.approx(12.5)
    assert metric.drop_stderr(before, after) == pytest.approx(100 * np.std([0, 1, 0, 0, 0, 0, 0, 0], ddof=1) / math.sqrt(8))


def test_default_metric_follows_labels_and_outputs():
    scores = {"y": np.zeros((3, 4), np.float32)}
    labelled = Dataset({"x": np.zeros((3, 1), np.float32)}, np.array([0, 1, 2]))
    assert tm.default_metric(scores, labelled).name == "top1"
    assert tm.default_metric(scores, Dataset(labelled.arrays)).name == "agreement"
    assert tm.default_metric({"y": np.zeros((3, 4, 5), np.float32)}, labelled).name == "rel-l2"


# ------------------------------------------------------------------------------------------------- attribution

def _linear(weights: np.ndarray) -> onnx.ModelProto:
    """x [N, F] → y = x · W  ([N, K]); a dynamic batch, so occlusions run as one batch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weights.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "linear", [x], [y],
                              [numpy_helper.from_array(weights.astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_occlusions_replace_one_cell_with_the_mean():
    sample = np.arange(8, dtype=np.float32).reshape(1, 8)
    parts = tm.occlusions(sample, cells=4)
    assert parts.shape == (4, 1, 8)
    np.testing.assert_array_equal(parts[1, 0], [0, 1, 3.5, 3.5, 4, 5, 6, 7])
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    grid = tm.occlusions(image, cells=2)  # 2 × 2 cells over H, W; each channel filled with its own mean
    assert grid.shape == (4, 1, 2, 4, 4)
    np.testing.assert_array_equal(grid[3, 0, 1, 2:, 2:], np.full((2, 2), image[0, 1].mean()))
    np.testing.assert_array_equal(grid[3, 0, :, :2], image[0, :, :2])


def test_occlusion_saliency_of_a_linear_model_is_known():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 1))
    x = rng.standard_normal((3, 16)).astype(np.float32)
    maps, classes = tm.occlusion_saliency(_linear(w), Dataset({"x": x}), cells=8)
    assert maps.shape == (3, 8) and classes == [None, None, None]  # one output value: not class scores
    for i in range(3):
        delta = (x[i] - x[i].mean()) * w[:, 0]  # occluding features j → y changes by Σ w_j (x_j − mean)
        expected = np.abs(delta.reshape(8, 2).sum(1)) / abs(float(x[i] @ w[:, 0]))
        np.testing.assert_allclose(maps[i], expected, rtol=1e-4)


def test_occlusion_saliency_of_a_classifier_explains_the_predicted_class():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 3))
    x = rng.standard_normal((2, 16)).astype(np.float32)
    maps, classes = tm.occlusion_saliency(_linear(w), Dataset({"x": x}), cells=4)
    for i in range(2):
        c = int((x[i] @ w).argmax())
        assert classes[i] == c
        expected = ((x[i] - x[i].mean()) * w[:, c]).reshape(4, 4).sum(1)  # the class score lost per cell
        np.testing.assert_allclose(maps[i], expected, rtol=1e-4, atol=1e-5)


def test_rank_correlation_and_top_k_overlap():
    assert tm.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert tm.spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert tm.spearman(np.array([1.0, 2, 2, 4]), np.array([1.0, 2, 3, 4])) == pytest.approx(0.9486833)  # ties
    assert tm.spearman(np.zeros(4), np.zeros(4)) == 1.0 and tm.spearman(np.zeros(4), np.arange(4.0)) == 0.0
    assert tm.top_k_overlap(np.array([5.0, 1, 4, 0]), np.array([5.0, 4, 0, 1]), 2) == 0.5


def test_attribution_metric_is_one_for_the_original_and_lower_when_weights_change():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 3))
    data = Dataset({"x": rng.standard_normal((4, 16)).astype(np.float32)})
    original = _linear(w)
    scorer = tm.Scorer(tm.parse_metric("attribution"), original, data)
    assert scorer.original.value == pytest.approx(1.0) and scorer.original.n == 4
    w2 = w.copy()
    w2[:8] *= -1  # half the features now push the other way: the explanation changes
    deformed = scorer.score(_linear(w2))
    assert deformed.value < 0.9 and scorer.drop(deformed) > 0.1
    assert scorer.score(_linear(w * 2.0)).value == pytest.approx(1.0)  # scaling keeps the ranking
    top = tm.Scorer(tm.parse_metric("attribution:top2"), original, data)
    assert top.metric.label == "attribution top-2 overlap" and top.original.value == 1.0


# ------------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, message", [
    ("accuracyy", "unknown metric (did you mean 'top1'?)"),
    ("top1:5", "top1 takes no argument"),
    ("mask-iou:high", "the threshold must be a number"),
    ("attribution:top0", "attribution compares maps by 'spearman' or 'topK'"),
])
def test_bad_metric_specs(text, message):
    assert message in _error(tm.parse_metric, text)


def test_aliases_and_callables():
    assert tm.parse_metric("IoU:0.3").label == "mask IoU (> 0.3)"
    assert tm.parse_metric("top-1").name == "top1"
    assert tm.resolve_metric(None) is None and tm.resolve_metric("") is None

    def positives(outputs, data):
        return (outputs["y"][:, 0] > 0).astype(float)

    metric = tm.resolve_metric(positives)
    data = Dataset({"x": np.zeros((4, 1), np.float32)})
    score = _score(metric, {"y": np.array([[1.0], [-1], [2], [3]])}, data)
    assert (metric.label, score.value, score.n) == ("positives (custom)", 0.75, 4)


def test_cli_metric_with_a_missing_dictionary_is_one_line_exit_2(tmp_path, capsys, digits_copy):
    code = cli.main([str(digits_copy), "--metric", "ctc:missing.txt", "--target", "none", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "squeeze: error: --metric 'ctc:missing.txt': dictionary missing.txt not found" in err
    assert not (tmp_path / "o").exists()


def test_cli_metric_needs_its_ground_truth(tmp_path, capsys, digits_copy):
    code = cli.main([str(digits_copy), "--metric", "mask-iou", "--eval", str(REPO / "models/digits_test.npz"),
                     "--target", "none", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no 'masks' array to score against" in err


# ------------------------------------------------------------------------------------------------- report

def test_report_names_the_metric_with_n_and_stderr():
    result = squeeze.compress(REPO / "models/digits_cnn.onnx", "cleanup", eval=REPO / "models/digits_test.npz",
                              targets="")
    block = result.report["metric"]
    assert (block["name"], block["default"], block["direction"], block["n"]) == ("top1", True, "higher is better", 540)
    assert block["original"] == pytest.approx(536 / 540) == pytest.approx(result.report["accuracy"]["original"]["top1"])
    p = 536 / 540
    assert block["stderr"]["original"] == pytest.approx(math.sqrt(p * (1 - p) / 539))
    table = squeeze.report.terminal_table(result.report)
    assert [line.split()[:3] for line in table.splitlines() if line.startswith("top-1")] == [["top-1", "(n=540)", "99.26"]]
    assert ("| top-1 (n=540) | evaluation | 99.26 % ± 0.37 | 99.26 % ± 0.37 | 0.00 pts ± 0.00 | McNemar b=0 c=0, p=1 "
            "(exact) |") in squeeze.report.markdown(result.report)


def test_report_with_a_fidelity_metric_and_no_labels():
    result = squeeze.compress(REPO / "models/digits_cnn.onnx", "cleanup", eval=REPO / "models/digits_calib.npz",
                              targets="", metric="rel-l2")
    block = result.report["metric"]
    assert (block["name"], block["default"], block["direction"], block["unit"]) == ("rel-l2", False,
                                                                                      "lower is better", "%")
    assert block["original"] == 0.0 and block["final"] < 1e-5
    assert "| rel. L2 error (rel-l2) (n=" in squeeze.report.markdown(result.report)


# ------------------------------------------------------------------------------------------------- corpus

def test_corpus_ocr_baselines(corpus):
    """MANIFEST §7: rec character accuracy 0.822 on all 256 lines, det mask IoU (> 0.2) 0.483 on all 64 pages."""
    rec = onnx.load(corpus.ROOT / "ppocrv6_tiny_rec/model.onnx")
    x, truth = corpus.ocr_arrays("ppocrv6_tiny_rec")
    data = Dataset({"x": x}, source="ocr_synth lines", texts=truth["texts"])
    ctc = tm.Scorer(tm.parse_metric(f"ctc:{corpus.ROOT / 'ppocrv6_tiny_rec/dict.txt'}"), rec, data)
    assert ctc.original.value == pytest.approx(0.822, abs=5e-4) and ctc.original.n == 256
    assert ctc.original.stderr == pytest.approx(0.011, abs=0.003)
    second = tm.Scorer(ctc.metric, rec, data.subset(128))  # the evaluation half
    assert second.original.value == pytest.approx(0.8087, abs=5e-4)
    det = onnx.load(corpus.ROOT / "ppocrv6_tiny_det/model.onnx")
    x, truth = corpus.ocr_arrays("ppocrv6_tiny_det")
    iou = tm.Scorer(tm.parse_metric("mask-iou:0.2"), det, Dataset({"x": x}, masks=truth["masks"]))
    assert iou.original.value == pytest.approx(0.483, abs=5e-4) and iou.original.n == 64
