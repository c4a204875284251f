"""The `cpu` target: TVM (Relax frontend, tvm.compile for the host) agrees with ONNX Runtime, is timed natively
after warm-up, and a model TVM cannot import gets a clear message naming the op while the report keeps the rest."""
from __future__ import annotations

import os
import platform

import numpy as np
import pytest

import graphs
import squeeze
from squeeze.data import input_specs, resolve_shapes
from squeeze.errors import TargetError
from squeeze.model import load_model
from squeeze.targets import tvm_build
from squeeze.targets.cpu import Cpu

pytestmark = pytest.mark.tvm

BUILT = ["conv_bn_relu", "residual_add", "split", "depthwise", "gemm_bn1d"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each tiny graph compiled once for the host CPU (ONNX Runtime's outputs alongside)."""
    work = tmp_path_factory.mktemp("cpu")
    target = Cpu()
    cores = os.sched_getaffinity(0)
    results = {}
    for name in BUILT:
        model = graphs.LOSSLESS[name]()
        samples = graphs.random_inputs(model, count=3, seed=2).samples(3)
        artifact = target.build(model, resolve_shapes(input_specs(model), {}), work)
        reference = graphs.outputs(model, graphs.random_inputs(model, count=3, seed=2))
        results[name] = (model, artifact, target.measure(artifact, samples, runs=50), reference)
    assert os.sched_getaffinity(0) == cores  # TVM's thread pool must not pin the process to one core
    return results


@pytest.mark.parametrize("name", BUILT)
def test_tvm_agrees_with_onnx_runtime(built, name):
    model, artifact, measured, reference = built[name]
    (expected,) = reference.values()
    got = measured.outputs["0"]
    got = got.reshape(expected.shape) if got.size == expected.size else got
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= 1e-5 * float(np.abs(expected).max())


@pytest.mark.parametrize("name", BUILT[:1])
def test_native_timing_after_warmup(built, name):
    _, artifact, measured, _ = built[name]
    assert measured.method == "native"
    latency = measured.latency_ms
    assert latency["runs"] >= 50
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"]
    assert artifact.build_seconds > 0 and artifact.target == "cpu"


def test_the_llvm_target_names_the_host_cpu(built):
    _, artifact, _, _ = built["conv_bn_relu"]
    host = tvm_build.host_cpu()
    assert host and host != "generic"
    assert f'"mcpu":"{host}"' in artifact.info["tvm_target"].replace(" ", "")
    assert str(Cpu(mcpu="x86-64").tvm_target().attrs["mcpu"]) == "x86-64"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 LLVM option")
def test_data_dependent_integer_selects_stay_conditional_moves():
    """A uint8 3×3/2 max pool over 55 output columns: LLVM vectorizes 48 of them and takes the rest in scalar code,
    whose max LLVM's `znver4` tuning turns into compare-and-branch unless the cpu target's LLVM options keep the
    `cmov` (a branch on activation values mispredicts: int8 squeezenet's pools ran 2-3× slower)."""
    import onnx
    from onnx import TensorProto, helper

    from squeeze.targets.cpu import X86_LLVM_OPTIONS
    from squeeze.targets.schedules import build_pipeline
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2])
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 111, 111])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 8, 55, 55])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    target = Cpu(mcpu="znver4").tvm_target()  # compiled, not run: any x86-64 host
    assert list(target.attrs["cl-opt"]) == list(X86_LLVM_OPTIONS)
    executable = tvm_build.compile_module(tvm_build.import_onnx(model, {"x": (1, 8, 111, 111)}), target,
                                          build_pipeline(target, threads=1))
    module = executable.mod.imports[0] if executable.mod.imports else executable.mod
    ops = [line.split()[0] for line in module.inspect_source("asm").splitlines()
           if line.startswith("\t") and not line.lstrip().startswith(".")]
    byte_branches = sum(a == "cmpb" and b in ("ja", "jae", "jb", "jbe") for a, b in zip(ops, ops[1:]))
    assert byte_branches == 0  # 27 without the option (TVM 0.27, LLVM 22)
    assert any(op.startswith("cmov") for op in ops)


@pytest.mark.corpus
def test_unsupported_slice_is_named(corpus, tmp_path):
    model = load_model(corpus.ROOT / "ultraface_rfb320/model.onnx")
    with pytest.raises(TargetError) as info:
        Cpu().build(model, {"input": (1, 3, 240, 320)}, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("TVM's ONNX frontend failed on op Slice (opset 9): ")


@pytest.mark.corpus
def test_unsupported_quantized_ops_are_named_and_the_report_keeps_everything_else(corpus, tmp_path):
    path = corpus.ROOT / "mnist8_zoo/model_qoperator_int8_derived.onnx"
    before = squeeze.model.sha256(path)
    result = squeeze.compress(path, "cleanup", targets="cpu", runs=5, out_dir=tmp_path / "out")
    assert result.ok
    report = result.report
    (cpu,) = report["targets"]
    assert cpu["name"] == "cpu" and "method" not in cpu
    assert cpu["error"].startswith("TVM's ONNX frontend cannot import the model: ")
    assert all(op in cpu["error"] for op in ("QLinearConv", "QLinearAdd", "QGemm"))
    # the rest of the report is all there
    assert report["original"]["param_count"] > 0 and report["final"]["ops"]["QLinearConv"] == 2
    assert report["passes"][0]["name"] == "cleanup" and report["fidelity"]["max_abs"] == 0.0
    assert report["onnxruntime"]["original"]["p50"] > 0
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert "QLinearConv" in (tmp_path / "out" / "report.md").read_text()
    assert squeeze.model.sha256(path) == before


def test_batch_reports_measured_throughput_on_all_cores(tmp_path):
    """`batch=4`: inferences/s at batch 1 and 4, each from its own build timed on all cores (batch / p50 of a
    measured call, not the batch-1 latency scaled); the latency row itself is unchanged."""
    from squeeze.runtime import cpu_count
    model = graphs.LOSSLESS["conv_bn_relu"]()
    shapes = resolve_shapes(input_specs(model), {})
    samples = graphs.random_inputs(model, count=2, seed=1).samples(2)
    target = Cpu(batch=4)
    artifact = target.build(model, shapes, tmp_path)
    measured = target.measure(artifact, samples, runs=20)
    entries = measured.extra["throughput"]
    assert [e["batch"] for e in entries] == [1, 4]
    for e in entries:
        assert e["threads"] == cpu_count() and e["latency_ms"]["runs"] >= 20
        assert e["inferences_per_s"] == pytest.approx(e["batch"] * 1e3 / e["latency_ms"]["p50"], rel=1e-3)
    assert measured.latency_ms["p50"] > 0 and measured.outputs["0"].shape[0] == 2
    assert any(n.startswith(f"throughput on {cpu_count()} cores: batch 1: ") for n in measured.notes)


def test_a_batch_the_model_cannot_take_is_reported_not_raised(tmp_path):
    """A Reshape to a constant [1, -1] shape cannot take batch 3: that entry says why; batch 1 is measured."""
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 32])
    model = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y],
                                                [shape]), opset_imports=[helper.make_opsetid("", 13)])
    samples = [{"x": np.ones((1, 2, 4, 4), np.float32)}]
    target = Cpu(batch=3)
    measured = target.measure(target.build(model, {"x": (1, 2, 4, 4)}, tmp_path), samples, runs=5)
    one, three = measured.extra["throughput"]
    assert one["inferences_per_s"] > 0 and "error" in three and "inferences_per_s" not in three


def test_cli_batch_must_be_positive(repo):
    from squeeze.cli import main
    assert main([str(repo / "models" / "digits_cnn.onnx"), "--target", "cpu", "--batch", "0"]) == 2
