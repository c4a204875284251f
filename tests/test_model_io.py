"""Model I/O: validated loading, atomic saving, IR-3 initializer inputs, and external data kept inside the folder."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from squeeze import model as model_io
from squeeze.errors import ModelLoadError, OutputError
from squeeze.model import file_bytes, load_model, save_model, sha256, to_graph, to_model


def _expect_load_error(path: Path, *fragments: str) -> str:
    before = sha256(path) if path.is_file() else None
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    if before is not None:
        assert sha256(path) == before
    return message


# ------------------------------------------------------------------------------------------------- loading

def test_load_good_model_leaves_the_file_untouched(digits_copy):
    before = sha256(digits_copy), digits_copy.stat().st_mtime_ns
    model = load_model(digits_copy)
    assert graphs.op_counts(model)["BatchNormalization"] == 4
    assert (sha256(digits_copy), digits_copy.stat().st_mtime_ns) == before


def test_missing_file_and_directory(tmp_path):
    _expect_load_error(tmp_path / "absent.onnx", "absent.onnx: no such file")
    _expect_load_error(tmp_path, "not a file")


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"ir_version: 8\ngraph { }\n"], ids=["empty", "text", "textproto"])
def test_not_onnx(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    message = _expect_load_error(path, "bad.onnx")
    assert "not" in message  # "not a valid ONNX file" or "not an ONNX model"


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_copies(tmp_path, repo, fraction):
    data = (repo / "models" / "digits_cnn.onnx").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[:max(1, int(len(data) * fraction))])
    _expect_load_error(path, "truncated.onnx")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    _expect_load_error(path, "random.onnx")


def test_checker_failure(tmp_path):
    path = tmp_path / "invalid.onnx"
    onnx.save(graphs.fails_checker(), path)
    _expect_load_error(path, "invalid.onnx: fails the ONNX checker")


def test_model_without_outputs(tmp_path):
    model = graphs.conv_bn_relu()
    del model.graph.output[:]
    path = tmp_path / "no_outputs.onnx"
    onnx.save(model, path)
    _expect_load_error(path, "the graph has no outputs")


# ------------------------------------------------------------------------------------------------- saving

def test_save_writes_exactly_the_model_and_no_temporary_files(tmp_path):
    model = graphs.residual_add()
    written = save_model(model, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString(deterministic=True)
    assert file_bytes(tmp_path / "out.onnx") == model.ByteSize() == model_io.serialized_bytes(model)


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.onnx"
    old = graphs.conv_bn_relu()
    save_model(old, path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_model(graphs.residual_add(), path)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # and the temporary file is gone


def test_save_refuses_to_write_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"keep me")
    (tmp_path / "link.onnx").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        save_model(graphs.conv_bn_relu(), tmp_path / "link.onnx")
    assert target.read_bytes() == b"keep me"


def test_round_trip_keeps_metadata():
    model = graphs.conv_bn_relu()
    model.producer_version = "1.2.3"
    model.doc_string = "doc"
    model.model_version = 7
    onnx.helper.set_model_props(model, {"author": "tests"})
    again = to_model(to_graph(model), like=model)
    assert (again.ir_version, again.producer_name, again.producer_version, again.doc_string, again.model_version) \
        == (model.ir_version, "squeeze-tests", "1.2.3", "doc", 7)
    assert {p.key: p.value for p in again.metadata_props} == {"author": "tests"}
    onnx.checker.check_model(again, full_check=True)


# ------------------------------------------------------------------------------------------------- IR 3

def test_ir3_initializers_stay_listed_as_inputs_after_a_pass(tmp_path):
    model = graphs.ir3_initializers_as_inputs()
    assert model.ir_version == 3
    out, _ = graphs.apply(model, "cleanup,fold-bn")
    assert out.ir_version == 3
    inputs = {i.name for i in out.graph.input}
    initializers = {t.name for t in out.graph.initializer}
    assert initializers <= inputs  # IR < 4 requires it
    assert inputs - initializers == {"x"}  # and the folded-away BN parameters are gone from both lists
    assert not any(name.startswith("bn.") for name in inputs)
    save_model(out, tmp_path / "ir3.onnx")
    again = load_model(tmp_path / "ir3.onnx")  # passes the checker as an IR-3 file
    assert again.ir_version == 3
    assert graphs.max_rel_error(model, again, graphs.random_inputs(model)) <= 1e-5


def test_ir3_corpus_model_keeps_initializers_as_inputs(corpus):
    model = load_model(corpus.model_path("mnist8_zoo"))
    out, _ = graphs.apply(model, "cleanup", corpus.dataset("mnist8_zoo", 16))
    assert out.ir_version == 3
    assert {t.name for t in out.graph.initializer} <= {i.name for i in out.graph.input}
    onnx.checker.check_model(out, full_check=True)


# ------------------------------------------------------------------------------------------------- external data

def _external(tmp_path: Path, location: str, data_file: Path | None = None) -> Path:
    """A conv_bn_relu model whose conv weight lives in external data at `location` (relative to tmp_path/model)."""
    model = graphs.conv_bn_relu()
    weight = next(t for t in model.graph.initializer if t.name == "conv.weight")
    raw = numpy_helper.to_array(weight).tobytes()
    if data_file is not None:
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_bytes(raw)
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    del weight.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        weight.external_data.add(key=key, value=value)
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_inside_the_folder_loads(tmp_path):
    path = _external(tmp_path, "weights.bin", tmp_path / "model" / "weights.bin")
    loaded = load_model(path)
    expected = numpy_helper.to_array(next(t for t in graphs.conv_bn_relu().graph.initializer if t.name == "conv.weight"))
    got = numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "conv.weight"))
    np.testing.assert_array_equal(got, expected)
    assert file_bytes(path) == path.stat().st_size + (tmp_path / "model" / "weights.bin").stat().st_size


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    path = _external(tmp_path, location, tmp_path / "secret.bin")
    _expect_load_error(path, "conv.weight", "outside the model's folder", location)


def test_external_data_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 432)
    path = _external(tmp_path, "weights.bin")
    (tmp_path / "model" / "weights.bin").symlink_to(tmp_path / "secret.bin")
    _expect_load_error(path, "symbolic link")


def test_external_data_through_a_hard_link_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 432)
    path = _external(tmp_path, "weights.bin")
    os.link(tmp_path / "secret.bin", tmp_path / "model" / "weights.bin")
    _expect_load_error(path, "hard link")


def test_missing_external_data_is_a_load_error(tmp_path):
    path = _external(tmp_path, "weights.bin")
    _expect_load_error(path, "model.onnx: ")


def test_short_external_data_is_a_load_error(tmp_path):
    path = _external(tmp_path, "weights.bin")
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0" * 100)  # the tensor needs 432 bytes
    _expect_load_error(path, "model.onnx: ")


def test_attributes_at_their_onnx_default_are_dropped_and_the_model_computes_the_same():
    """Conv strides/dilations 1, pads 0, group 1 and schema defaults (Gemm alpha/beta 1, LeakyRelu alpha 0.01)
    leave the node; values that differ stay; ONNX Runtime gives the same outputs."""
    from onnx import helper
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "w2")
    fc = numpy_helper.from_array(rng.normal(size=(5, 64)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], strides=[1, 1], dilations=[1, 1], pads=[0, 0, 0, 0],
                              group=1, kernel_shape=[3, 3]),
             helper.make_node("LeakyRelu", ["a"], ["b"], alpha=0.01),
             helper.make_node("Conv", ["b", "w2"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1]),
             helper.make_node("Flatten", ["c"], ["d"], axis=1),
             helper.make_node("Gemm", ["d", "fc"], ["y"], alpha=1.0, beta=1.0, transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 10, 10])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])], [w1, w2, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compact = onnx.ModelProto()
    compact.CopyFrom(model)
    assert model_io.drop_default_attributes(compact) == 9
    kept = {n.op_type + str(i): sorted(a.name for a in n.attribute) for i, n in enumerate(compact.graph.node)}
    assert kept == {"Conv0": ["kernel_shape"], "LeakyRelu1": [], "Conv2": ["pads", "strides"], "Flatten3": [],
                    "Gemm4": ["transB"]}
    onnx.checker.check_model(compact, full_check=True)
    x = {"x": np.random.default_rng(1).normal(size=(1, 3, 10, 10)).astype(np.float32)}
    import onnxruntime as ort
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
           for m in (model, compact)]
    np.testing.assert_array_equal(run[0], run[1])
    assert compact.ByteSize() < model.ByteSize()
