"""The Python API: `squeeze.compress(...)` and `Result.save`, the same code path as the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphs
from helpers import REPORT_FILES, outputs_in
import squeeze
from squeeze import api
from squeeze.data import Dataset, input_specs, load_npz
from squeeze.errors import ModelLoadError, OutputError, SpecError, TargetError
from squeeze.model import sha256
from squeeze.registry import TARGETS, register_target
from squeeze.targets.base import Artifact, Measurement, Target


# ------------------------------------------------------------------------------------------------- compress

def test_compress_an_in_memory_model():
    model = graphs.conv_bn_relu()
    result = squeeze.compress(model, "cleanup,fold-bn", targets="", runs=3)
    assert result.ok and result.failure is None and result.files == []
    report = result.report
    assert report["model"] == {"path": None, "sha256": None, "inputs": {"x": [1, 3, 8, 8]}}
    assert report["pass_spec"] == "cleanup,fold-bn" and report["targets"] == []
    assert report["original"]["bytes"]["file"] == model.ByteSize()
    assert report["final"]["bytes"]["file"] == result.model.ByteSize()
    assert report["fidelity"]["max_abs_rel"] <= 1e-5
    assert "accuracy" not in report  # no labels
    assert graphs.op_counts(result.model) == {"Conv": 1, "Relu": 1}
    assert model.graph.node[1].op_type == "BatchNormalization"  # the caller's model is untouched


def test_passes_as_a_list_and_no_passes():
    model = graphs.residual_add()
    listed = squeeze.compress(model, ["cleanup", "fold-bn"], targets="", runs=3).report
    assert [p["name"] for p in listed["passes"]] == ["cleanup", "fold-bn"]
    none = squeeze.compress(model, "", targets="", runs=3).report
    assert none["passes"] == [] and none["pass_spec"] == "" and none["fidelity"] is None
    assert none["final"] == none["original"]
    assert none["onnxruntime"]["final"] == none["onnxruntime"]["original"]


def test_datasets_with_labels_give_accuracy(repo):
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    test = load_npz(repo / "models" / "digits_test.npz", input_specs(model))
    calib = Dataset({"input": test.arrays["input"][:32]}, source="first 32 test images")
    report = squeeze.compress(model, "fold-bn", calib=calib, eval=test, targets="", runs=3).report
    assert report["data"] == {"calib": "first 32 test images", "calib_samples": 32, "calib_synthetic": False,
                              "calib_fit_samples": 32, "val": None, "val_samples": 0,
                              "val_role": "none: nothing chooses without --max-drop or --goal",
                              "eval": test.source, "eval_samples": 540}
    acc = report["accuracy"]
    assert acc["original"]["top1"] == acc["final"]["top1"] == pytest.approx(536 / 540)
    assert acc["drop_pts"] == 0.0 and acc["original"]["n"] == 540
    assert report["passes"][0]["accuracy"]["top1"] == pytest.approx(536 / 540)


def test_bad_spec_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(SpecError, match="unknown pass 'nosuchpass'"):
        squeeze.compress(tmp_path / "absent.onnx", "nosuchpass", out_dir=tmp_path / "out")
    with pytest.raises(SpecError, match="unknown target 'nosuchtarget'"):
        squeeze.compress(tmp_path / "absent.onnx", "cleanup", targets="nosuchtarget", out_dir=tmp_path / "out")
    with pytest.raises(ModelLoadError, match="absent.onnx: no such file"):
        squeeze.compress(tmp_path / "absent.onnx", "cleanup", targets="", out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_progress_messages():
    messages: list[str] = []
    squeeze.compress(graphs.conv_bn_relu(), "cleanup,fold-bn", targets="", runs=3, progress=messages.append)
    assert "pass 1/2: cleanup" in messages and "pass 2/2: fold-bn" in messages


# ------------------------------------------------------------------------------------------------- files

def test_out_dir_gets_the_model_and_reports_and_the_input_is_untouched(tmp_path, digits_copy):
    before = (sha256(digits_copy), digits_copy.stat().st_mtime_ns)
    out = tmp_path / "out"
    result = squeeze.compress(digits_copy, "fold-bn", targets="", out_dir=out, runs=3)
    assert (sha256(digits_copy), digits_copy.stat().st_mtime_ns) == before
    assert outputs_in(out) == REPORT_FILES
    assert sorted(p.name for p in result.files) == REPORT_FILES
    saved = onnx.load(out / "model.onnx")
    assert saved.SerializeToString() == result.model.SerializeToString()
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["path"] == str(digits_copy) and report["model"]["sha256"] == before[0]
    assert report["final"]["bytes"]["file"] == (out / "model.onnx").stat().st_size
    assert report["original"]["bytes"]["file"] == digits_copy.stat().st_size


def test_result_save(tmp_path):
    result = squeeze.compress(graphs.depthwise(), "fold-bn", targets="", runs=3)
    saved = result.save(tmp_path / "saved")
    assert saved == tmp_path / "saved"
    assert outputs_in(saved) == REPORT_FILES
    assert onnx.load(saved / "model.onnx").SerializeToString() == result.model.SerializeToString()
    report = json.loads((saved / "report.json").read_text())
    assert report["schema"] == 1 and report["pass_spec"] == "fold-bn"
    assert report["final"]["bytes"]["file"] == (saved / "model.onnx").stat().st_size
    assert (saved / "report.md").read_text().startswith("# squeeze report")
    result.save(saved)  # a folder holding a squeeze report may be written again

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no squeeze report; choose another -o or pass --force"):
        result.save(foreign)
    assert outputs_in(foreign) == ["notes.txt"]
    result.save(foreign, force=True)
    assert outputs_in(foreign) == sorted(["notes.txt"] + REPORT_FILES)


def test_report_json_is_plain_json_even_with_non_finite_numbers(tmp_path):
    result = squeeze.compress(graphs.conv_bn_relu(), "", targets="", runs=3)
    result.report["fidelity"] = {"max_abs": float("inf"), "rel_l2": np.float32(0.5)}
    result.save(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fidelity"] == {"max_abs": "inf", "rel_l2": 0.5}


# ------------------------------------------------------------------------------------------------- targets

@pytest.fixture
def fake_targets():
    """Targets without TVM, registered for the test only."""
    added = []

    def register(name):
        def decorate(cls):
            register_target(name)(cls)
            added.append(name)
            return cls
        return decorate

    @register("test-api-missing")
    class Missing(Target):
        """Needs a toolchain that is not installed."""
        def missing(self):
            return "needs the frobnicator toolchain: install it with scripts/frob.sh"
        def tvm_target(self): ...
        def build(self, model, shapes, workdir): raise AssertionError("not called")
        def measure(self, artifact, samples, runs): raise AssertionError("not called")

    @register("test-api-unsupported")
    class Unsupported(Target):
        """Cannot build the model."""
        def tvm_target(self): ...
        def build(self, model, shapes, workdir): raise TargetError("TVM's ONNX frontend cannot import: FancyOp")
        def measure(self, artifact, samples, runs): raise AssertionError("not called")

    @register("test-api-buggy")
    class Buggy(Target):
        """Has a bug."""
        def tvm_target(self): ...
        def build(self, model, shapes, workdir): raise ZeroDivisionError("oops")
        def measure(self, artifact, samples, runs): raise AssertionError("not called")

    @register("test-api-writes")
    class Writes(Target):
        """Writes an artifact file into its workdir and echoes the inputs (an identity 'device')."""
        def tvm_target(self): ...
        def build(self, model, shapes, workdir):
            (Path(workdir) / "artifact.bin").write_bytes(b"\0" * 16)
            return Artifact(self.name, handle=str(workdir), build_seconds=0.001)
        def measure(self, artifact, samples, runs):
            return Measurement("emulated", latency_ms=None, notes=[f"built in {artifact.handle}"])

    yield
    for name in added:
        TARGETS.pop(name, None)


def test_target_failures_become_report_rows(fake_targets, tmp_path):
    result = squeeze.compress(graphs.conv_bn_relu(), "fold-bn", targets="test-api-missing,test-api-unsupported,"
                              "test-api-buggy", out_dir=tmp_path / "out", runs=3)
    assert result.ok  # the model and everything else are still there
    rows = result.report["targets"]
    assert [r["name"] for r in rows] == ["test-api-missing", "test-api-unsupported", "test-api-buggy"]
    assert rows[0]["error"] == "needs the frobnicator toolchain: install it with scripts/frob.sh"
    assert rows[1]["error"] == "TVM's ONNX frontend cannot import: FancyOp"
    assert rows[2]["error"] == "internal error in target 'test-api-buggy': ZeroDivisionError: oops"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["final"]["ops"] == {"Conv": 1, "Relu": 1} and report["onnxruntime"]["final"]["p50"] > 0
    assert "**error:** TVM's ONNX frontend cannot import: FancyOp" in (tmp_path / "out" / "report.md").read_text()


def test_targets_never_write_into_the_working_directory(fake_targets, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (row,) = squeeze.compress(graphs.conv_bn_relu(), "", targets="test-api-writes", runs=3).report["targets"]
    assert row["method"] == "emulated" and "error" not in row
    assert list(cwd.iterdir()) == []
    (row,) = squeeze.compress(graphs.conv_bn_relu(), "", targets="test-api-writes", runs=3,
                              out_dir=tmp_path / "out").report["targets"]
    assert (tmp_path / "out" / "artifact.bin").stat().st_size == 16  # with an out_dir, artifacts land there
    assert list(cwd.iterdir()) == []


def test_numeric_check_flags_mismatches():
    model = graphs.flatten_gemm()
    samples = graphs.random_inputs(model, count=3).samples(3)
    reference = np.stack([graphs.outputs(model, Dataset({"x": s["x"]}))["y"] for s in samples])  # [3,1,5]
    good = api._numeric_check(model, samples, {"0": reference}, None)
    assert good["ok"] is True and good["max_abs"] == 0.0 and good["top1_agreement"] == 1.0 and good["samples"] == 3
    swapped = reference.copy()
    swapped[0, 0] = swapped[0, 0][::-1]  # a different class wins for sample 0
    bad = api._numeric_check(model, samples, {"0": swapped}, None)
    assert bad["ok"] is False and bad["top1_agreement"] == pytest.approx(2 / 3)
    shaped = api._numeric_check(model, samples, {"0": reference[:, :, :4]}, None)
    assert shaped["ok"] is False and "output shapes differ" in shaped["error"]


def test_the_core_and_the_passes_do_not_import_tvm(tmp_path):
    code = ("import sys; import squeeze, squeeze.api, squeeze.passes; from squeeze.registry import all_passes, "
            "all_targets; all_passes(); all_targets(); print('tvm' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def compressed(tmp_path_factory, repo):
    """One API run on the shipped model with TVM on the CPU, then Result.save."""
    work = tmp_path_factory.mktemp("api_e2e")
    result = squeeze.compress(repo / "models" / "digits_cnn.onnx", "cleanup,fold-bn",
                              calib=repo / "models" / "digits_calib.npz", eval=repo / "models" / "digits_test.npz",
                              targets="cpu", threads=2)
    return result, result.save(work / "out")


@pytest.mark.tvm
def test_api_end_to_end(compressed, repo):
    result, out = compressed
    assert result.ok
    assert outputs_in(out) == REPORT_FILES
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["sha256"] == sha256(repo / "models" / "digits_cnn.onnx")
    assert report["accuracy"]["original"]["top1"] == report["accuracy"]["final"]["top1"] == pytest.approx(536 / 540)
    assert "BatchNormalization" not in report["final"]["ops"]
    (cpu,) = report["targets"]
    assert "error" not in cpu, cpu.get("error")
    assert cpu["method"] == "native" and cpu["latency_ms"]["runs"] >= 50
    assert 0 < cpu["latency_ms"]["p50"] <= cpu["latency_ms"]["p90"]
    assert cpu["baseline"]["engine"] == "onnxruntime" and cpu["baseline"]["latency_ms"]["p50"] > 0
    assert cpu["numeric_check"]["ok"] is True and cpu["numeric_check"]["max_abs_rel"] <= 1e-5
    assert report["final"]["bytes"]["file"] == (out / "model.onnx").stat().st_size
    assert json.loads(json.dumps(result.report, default=str))["targets"][0]["method"] == "native"
    assert "| cpu | native |" in (out / "report.md").read_text()
