"""Model inputs and data: npz named after the inputs, one unnamed array, labels, DataErrors for mismatches,
dynamic dimensions from --input-shape or data, and deterministic synthetic inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphs
from helpers import write_npz
import squeeze
from squeeze.data import (Dataset, input_specs, load_npz, parse_shape_overrides, resolve_shapes, synthesize)
from squeeze.errors import DataError


def _data_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------- specs

def test_input_specs_leave_out_initializers_listed_as_inputs():
    model = graphs.ir3_initializers_as_inputs()
    assert len(model.graph.input) == 10
    (spec,) = input_specs(model)
    assert (spec.name, spec.dtype, spec.shape, spec.is_static) == ("x", np.float32, (1, 3, 8, 8), True)


def test_input_specs_keep_symbolic_dims():
    (spec,) = input_specs(graphs.dynamic_dims())
    assert spec.shape == ("N", 3, "H", "W") and not spec.is_static


# ------------------------------------------------------------------------------------------------- npz

def test_npz_named_after_inputs_with_labels(tmp_path):
    specs = input_specs(graphs.two_inputs())
    a, b = np.arange(12, dtype=np.float64).reshape(3, 4), np.ones((3, 4), np.float32)
    data = load_npz(write_npz(tmp_path, a=a, b=b, labels=np.array([0, 2, 1], np.uint8)), specs)
    assert len(data) == 3
    assert data.arrays["a"].dtype == np.float32  # converted to the input's dtype
    np.testing.assert_array_equal(data.arrays["a"], a.astype(np.float32))
    assert data.labels.tolist() == [0, 2, 1] and data.labels.dtype == np.int64
    assert data.source.endswith("data.npz (3 samples)")
    assert data.samples(2)[1]["a"].shape == (1, 4)


def test_single_unnamed_array_is_taken_for_the_only_input(tmp_path):
    specs = input_specs(graphs.conv_bn_relu())
    x = np.random.default_rng(0).standard_normal((5, 1, 3, 8, 8)).astype(np.float32)  # samples × [1,3,8,8]
    data = load_npz(write_npz(tmp_path, arr_0=x), specs)
    assert list(data.arrays) == ["x"] and len(data) == 5
    assert data.stacked == {"x": False}
    assert data.samples(1)[0]["x"].shape == (1, 3, 8, 8)
    data = load_npz(write_npz(tmp_path, "stacked.npz", images=x[:, 0], labels=np.arange(5)), specs)
    assert data.stacked == {"x": True} and data.sample_shape(specs[0]) == (1, 3, 8, 8)
    assert data.labels.tolist() == [0, 1, 2, 3, 4]


def test_shipped_digits_data_loads(repo):
    specs = input_specs(onnx.load(repo / "models" / "digits_cnn.onnx"))
    test = load_npz(repo / "models" / "digits_test.npz", specs)
    assert (len(test), test.arrays["input"].shape, test.labels.shape) == (540, (540, 1, 8, 8), (540,))


@pytest.mark.parametrize("arrays, expected", [
    ({"foo": np.zeros((3, 4)), "bar": np.zeros((3, 4))}, "no array for input(s) ['a', 'b']; the file has ['bar', 'foo']"),
    ({"a": np.zeros((3, 4))}, "no array for input(s) ['b']"),
    ({"a": np.zeros((3, 4)), "b": np.zeros((3, 4)), "c": np.zeros((3, 4))}, "arrays ['c'] match no model input"),
    ({"a": np.zeros((3, 5)), "b": np.zeros((3, 4))}, "array 'a' has samples of shape [1, 5], but the model expects [1, 4]"),
    ({"a": np.zeros((3, 4, 4, 4)), "b": np.zeros((3, 4))}, "array 'a' has shape [3, 4, 4, 4], but the model expects"),
    ({"a": np.zeros((3, 4)), "b": np.zeros((2, 4))}, "arrays have different sample counts (3 vs 2 for 'b')"),
    ({"a": np.zeros((0, 4)), "b": np.zeros((0, 4))}, "the arrays hold no samples"),
    ({"a": np.float32(1), "b": np.zeros((3, 4))}, "array 'a' is a scalar"),
    ({"a": np.array([["x"] * 4] * 3), "b": np.zeros((3, 4))}, "array 'a' has non-numeric dtype"),
    ({"a": np.zeros((3, 4)), "b": np.zeros((3, 4)), "labels": np.zeros(2, np.int64)}, "'labels' must be a 1-D integer array"),
    ({"a": np.zeros((3, 4)), "b": np.zeros((3, 4)), "labels": np.zeros(3)}, "'labels' must be a 1-D integer array"),
    ({"a": np.zeros((3, 4)), "b": np.zeros((3, 4)), "labels": np.zeros((3, 1), np.int64)}, "'labels' must be a 1-D"),
])
def test_mismatched_npz_is_a_data_error(tmp_path, arrays, expected):
    path = write_npz(tmp_path, **arrays)
    message = _data_error(load_npz, path, input_specs(graphs.two_inputs()))
    assert message.startswith(str(path) + ": ")
    assert expected in message


def test_npz_ground_truth_texts_and_masks(tmp_path):
    specs = input_specs(graphs.two_inputs())
    a = np.zeros((3, 4), np.float32)
    masks = np.arange(3 * 2 * 2).reshape(3, 2, 2) % 2
    data = load_npz(write_npz(tmp_path, a=a, b=a, texts=np.array(["ab", "", "c d"]), masks=masks), specs)
    assert data.texts.tolist() == ["ab", "", "c d"] and data.labels is None
    np.testing.assert_array_equal(data.masks, masks)
    part = data.subset(1, 3)  # ground truth follows the samples
    assert part.texts.tolist() == ["", "c d"] and part.masks.shape == (2, 2, 2) and len(part) == 2
    utf8 = load_npz(write_npz(tmp_path, "bytes.npz", a=a, b=a, texts=np.array(["é".encode(), b"x", b""])), specs)
    assert utf8.texts.tolist() == ["é", "x", ""]


def test_an_input_named_like_ground_truth_stays_an_input(tmp_path):
    x = helper.make_tensor_value_info("masks", onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["masks"], ["y"])], "g", [x], [y]))
    data = load_npz(write_npz(tmp_path, masks=np.ones((2, 4), np.float32)), input_specs(model))
    assert list(data.arrays) == ["masks"] and data.masks is None


@pytest.mark.parametrize("truth, expected", [
    ({"texts": np.array(["a", "b"])}, "'texts' must be a 1-D array of strings with one text per sample (3)"),
    ({"texts": np.arange(3)}, "'texts' must be a 1-D array of strings"),
    ({"texts": np.array([["a"], ["b"], ["c"]])}, "it has dtype <U1 and shape [3, 1]"),
    ({"texts": np.array([b"\xff", b"a", b"b"])}, "'texts' holds bytes that are not UTF-8"),
    ({"masks": np.zeros((2, 4, 4))}, "'masks' must hold one mask per sample on the first axis (3, H, W)"),
    ({"masks": np.zeros(3)}, "'masks' must hold one mask per sample"),
    ({"masks": np.array([["x"] * 2] * 3)}, "'masks' has dtype <U1"),
    ({"masks": np.full((3, 2), np.nan)}, "'masks' holds NaN or infinite values"),
])
def test_bad_ground_truth_is_a_data_error(tmp_path, truth, expected):
    a = np.zeros((3, 4), np.float32)
    message = _data_error(load_npz, write_npz(tmp_path, a=a, b=a, **truth), input_specs(graphs.two_inputs()))
    assert expected in message


def test_unreadable_npz(tmp_path):
    specs = input_specs(graphs.two_inputs())
    assert "no such file" in _data_error(load_npz, tmp_path / "absent.npz", specs)
    (tmp_path / "text.npz").write_text("not a zip")
    assert "not a readable .npz file" in _data_error(load_npz, tmp_path / "text.npz", specs)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "objects.npy").rename(tmp_path / "objects.npz")
    assert "not a readable .npz file" in _data_error(load_npz, tmp_path / "objects.npz", specs)


# ------------------------------------------------------------------------------------------------- shapes

def test_parse_shape_overrides():
    assert parse_shape_overrides(["x=1x3x32x32", "mask=2X5"]) == {"x": (1, 3, 32, 32), "mask": (2, 5)}
    assert parse_shape_overrides(["1x3x8x8"]) == {"": (1, 3, 8, 8)}
    assert parse_shape_overrides(["a:b=4"]) == {"a:b": (4,)}
    assert parse_shape_overrides(None) == {}
    assert "expected NAME=DxDxD" in _data_error(parse_shape_overrides, ["x=1xQx3"])
    assert "dimensions must be positive" in _data_error(parse_shape_overrides, ["x=1x0x3"])


def test_dynamic_dims_from_input_shape():
    specs = input_specs(graphs.dynamic_dims())
    assert resolve_shapes(specs, {"x": (2, 3, 16, 12)}) == {"x": (2, 3, 16, 12)}
    assert resolve_shapes(specs, {"": (1, 3, 5, 5)}) == {"x": (1, 3, 5, 5)}


def test_dynamic_dims_from_data(tmp_path):
    specs = input_specs(graphs.dynamic_dims())
    data = load_npz(write_npz(tmp_path, x=np.zeros((7, 3, 10, 6), np.float32)), specs)
    assert resolve_shapes(specs, {}, data) == {"x": (1, 3, 10, 6)}


def test_only_a_dynamic_batch_defaults_to_one():
    assert resolve_shapes(input_specs(graphs.dynamic_batch()), {}) == {"x": (1, 16)}


def test_unresolved_dynamic_dims_without_data_is_a_clear_error():
    message = _data_error(resolve_shapes, input_specs(graphs.dynamic_dims()), {})
    assert message == ("input 'x' has dynamic dimensions [N, 3, H, W]; give them with --input-shape x=Nx3xNxN "
                       "or pass --calib data")


@pytest.mark.parametrize("overrides, expected", [
    ({"y": (1, 3, 8, 8)}, "--input-shape names unknown input(s) ['y']; inputs are: x"),
    ({"x": (1, 4, 8, 8)}, "--input-shape x=1x4x8x8 does not fit the model's shape [N, 3, H, W]"),
    ({"x": (1, 3, 8)}, "--input-shape x=1x3x8 does not fit"),
])
def test_bad_input_shapes(overrides, expected):
    assert expected in _data_error(resolve_shapes, input_specs(graphs.dynamic_dims()), overrides)


def test_bare_input_shape_needs_a_single_input_model():
    assert "only allowed for single-input models; inputs are: a, b" in \
        _data_error(resolve_shapes, input_specs(graphs.two_inputs()), {"": (1, 4)})


def test_compress_without_shapes_or_data_raises_before_writing(tmp_path):
    path = tmp_path / "dynamic.onnx"
    onnx.save(graphs.dynamic_dims(), path)
    with pytest.raises(DataError, match="--input-shape x="):
        squeeze.compress(path, "cleanup", targets="", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compress_takes_dynamic_dims_from_input_shape_or_data(tmp_path):
    model = graphs.dynamic_dims()
    result = squeeze.compress(model, "cleanup", targets="", input_shapes=["x=1x3x12x10"], runs=3)
    assert result.report["model"]["inputs"] == {"x": [1, 3, 12, 10]}
    assert result.report["original"]["macs"] == 4 * 12 * 10 * 3 * 9
    path = write_npz(tmp_path, x=np.zeros((4, 3, 6, 6), np.float32))
    result = squeeze.compress(model, "cleanup", calib=path, targets="", runs=3)
    assert result.report["model"]["inputs"] == {"x": [1, 3, 6, 6]}
    assert result.report["data"]["calib_samples"] == 4 and not result.report["data"]["calib_synthetic"]


def test_eval_data_that_does_not_fit_the_resolved_shape_is_refused(tmp_path):
    path = write_npz(tmp_path, x=np.zeros((4, 3, 6, 6), np.float32))
    with pytest.raises(DataError, match=r"samples of 'x' have shape \[1, 3, 6, 6\], but the model is measured "
                                        r"with \[1, 3, 9, 9\]"):
        squeeze.compress(graphs.dynamic_dims(), "", eval=path, input_shapes=["1x3x9x9"], targets="")


# ------------------------------------------------------------------------------------------------- batches

def test_batches_along_a_dynamic_batch_and_one_sample_otherwise():
    specs = input_specs(graphs.dynamic_batch())
    data = Dataset({"x": np.zeros((150, 16), np.float32)})
    assert [f["x"].shape for f in data.batches(specs)] == [(64, 16), (64, 16), (22, 16)]
    static = input_specs(graphs.gemm_bn1d())  # x[2,16]: each sample is a whole feed
    data = Dataset({"x": np.zeros((3, 2, 16), np.float32)}, stacked={"x": False})
    assert [f["x"].shape for f in data.batches(static)] == [(2, 16)] * 3


def test_subset_keeps_labels_aligned():
    data = Dataset({"x": np.arange(10, dtype=np.float32)[:, None]}, np.arange(10) * 2)
    part = data.subset(3, 6)
    assert part.arrays["x"][:, 0].tolist() == [3, 4, 5] and part.labels.tolist() == [6, 8, 10]


# ------------------------------------------------------------------------------------------------- synthetic

def test_synthetic_data_is_deterministic_with_the_seed():
    specs = input_specs(graphs.conv_bn_relu())
    shapes = resolve_shapes(specs, {})
    a, b, c = synthesize(specs, shapes, 6, seed=3), synthesize(specs, shapes, 6, seed=3), synthesize(specs, shapes, 6, seed=4)
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
    assert not np.array_equal(a.arrays["x"], c.arrays["x"])
    assert a.arrays["x"].shape == (6, 3, 8, 8) and a.arrays["x"].dtype == np.float32
    assert a.labels is None
    assert a.source == "synthetic (N(0,1), seed 3, 6 samples)"
    assert abs(float(a.arrays["x"].mean())) < 0.2 and 0.8 < float(a.arrays["x"].std()) < 1.2


def test_synthetic_integer_and_bool_inputs():
    from squeeze.data import InputSpec
    specs = [InputSpec("ids", np.dtype(np.int64), (1, 5)), InputSpec("mask", np.dtype(np.bool_), (1, 5))]
    data = synthesize(specs, {"ids": (1, 5), "mask": (1, 5)}, 4, seed=0)
    assert data.arrays["ids"].dtype == np.int64 and set(np.unique(data.arrays["ids"])) <= {0, 1, 2, 3}
    assert data.arrays["mask"].dtype == np.bool_


def test_report_says_when_calibration_data_is_synthetic():
    report = squeeze.compress(graphs.conv_bn_relu(), "fold-bn", targets="", seed=5, runs=3).report
    assert report["data"]["calib_synthetic"] is True
    assert report["data"]["calib"] == "synthetic (N(0,1), seed 5, 32 samples)"
    assert report["data"]["eval"] is None and report["seed"] == 5
    again = squeeze.compress(graphs.conv_bn_relu(), "fold-bn", targets="", seed=5, runs=3).report
    assert again["passes"][0]["fidelity"] == report["passes"][0]["fidelity"]  # same seed, same numbers
