"""A pass that crashes, breaks the graph, renames weights or writes multi-line messages: the pipeline keeps the
last good model, records the failure on one line, and never touches the previous model or the caller's input."""
from __future__ import annotations

import subprocess
import sys

import onnx_graphsurgeon as gs
import pytest

import graphs
import squeeze


def _run(model, spec: str, **kw):
    return squeeze.compress(model, spec, targets="", runs=1, threads=1, **kw)


def test_a_pass_raising_a_bug_is_contained_and_the_last_good_model_kept(temp_pass, tmp_path):
    @temp_pass("test-crash")
    def crash(graph, ctx):
        graph.nodes.clear()  # half-done edits must not leak either
        raise TypeError("object of type 'NoneType' has no len()")

    model = graphs.conv_bn_relu()
    before = model.SerializeToString(deterministic=True)
    result = _run(model, "fold-bn,test-crash", out_dir=tmp_path / "out")
    assert result.failure == "pass 'test-crash' failed with TypeError: object of type 'NoneType' has no len()"
    assert isinstance(result.exception, TypeError)
    assert [s["name"] for s in result.report["passes"]] == ["fold-bn", "test-crash"]
    assert "failed" in result.report["passes"][1] and "failed" not in result.report["passes"][0]
    assert graphs.op_counts(result.model)["BatchNormalization"] == 0  # fold-bn's model is the last good one
    assert (tmp_path / "out" / "model.onnx").read_bytes() == result.model.SerializeToString(deterministic=True)
    assert model.SerializeToString(deterministic=True) == before


def test_a_pass_that_breaks_the_graph_fails_verification(temp_pass):
    @temp_pass("test-break")
    def dangle(graph, ctx):
        node = graph.nodes[-1]
        node.inputs[0] = gs.Variable("nowhere", dtype=None)

    result = _run(graphs.conv_bn_relu(), "test-break")
    assert result.failure.startswith("pass 'test-break' failed: ")
    assert "\n" not in result.failure
    assert result.model.SerializeToString() == graphs.conv_bn_relu().SerializeToString()


def test_renaming_a_weight_never_touches_the_previous_model(temp_pass):
    """graphsurgeon writes a renamed constant's name into the TensorProto it came from (the previous model's)."""
    @temp_pass("test-rename")
    def rename(graph, ctx):
        graph.tensors()["conv.weight"].name = "renamed"

    model = graphs.conv_bn_relu()
    before = model.SerializeToString(deterministic=True)
    result = _run(model, "test-rename")
    assert result.ok, result.failure
    assert "renamed" in {t.name for t in result.model.graph.initializer}
    assert model.SerializeToString(deterministic=True) == before


def test_multi_line_messages_become_one_line(temp_pass):
    from squeeze.errors import PassError

    @temp_pass("test-lines")
    def lines(graph, ctx):
        raise PassError("first line\nsecond line\n\n  third\n")

    result = _run(graphs.conv_bn_relu(), "test-lines")
    assert result.failure == "pass 'test-lines' failed: first line; second line; third"


def test_ctrl_c_inside_a_pass_is_not_swallowed(temp_pass):
    @temp_pass("test-interrupt")
    def interrupt(graph, ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(graphs.conv_bn_relu(), "test-interrupt")


def test_the_cli_prints_a_multi_line_error_on_one_line(tmp_path):
    code = ("import sys; from squeeze import cli; from squeeze.errors import SqueezeError\n"
            "def boom(argv): raise SqueezeError('one\\ntwo')\n"
            "cli._run = boom\n"
            "sys.exit(cli.main(['x.onnx']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["squeeze: error: one; two"]


def test_a_pass_crash_through_the_cli_is_one_line_exit_2(tmp_path):
    """quant on a model whose weights come through Cast nodes raised a TypeError inside the pass (contained)."""
    from robustness import models
    path = tmp_path / "m.onnx"
    path.write_bytes(models.int_weights().SerializeToString())
    proc = subprocess.run([sys.executable, "-m", "squeeze", path, "--passes", "cleanup,quant", "--target", "none",
                           "-o", tmp_path / "out", "--runs", "1"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode in (0, 2), proc.stderr
    lines = proc.stderr.splitlines()
    if proc.returncode == 2:
        assert len(lines) == 1 and lines[0].endswith("(kept the last good model)"), proc.stderr
    else:
        assert lines == []
    assert (tmp_path / "out" / "model.onnx").exists()
    assert "Traceback" not in proc.stderr
