"""The command line: user errors are one line on stderr with exit code 2 and the input untouched; the default
output folder; `python -m squeeze`; and an end-to-end run on the shipped model with TVM on the CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphs
from helpers import REPORT_FILES, outputs_in, write_npz
from squeeze.model import sha256

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CI": "1"}


def squeeze_cli(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeeze", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------- errors

def _not_writable_output(tmp_path: Path) -> Path:
    """A folder squeeze cannot create or write: a read-only dir, or (as root, where chmod does not stop
    writes) a path below a regular file."""
    if os.geteuid() == 0:
        blocker = tmp_path / "a_file"
        blocker.write_text("a regular file")
        return blocker / "out"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


def _foreign_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not squeeze's")
    return folder


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


# id -> (args builder given (tmp_path, model copy), expected fragment of the message)
ERRORS = {
    "missing file": (lambda t, m: [t / "absent.onnx"], "absent.onnx: no such file"),
    "directory": (lambda t, m: [t], "not a file"),
    "text file": (lambda t, m: [_write(t, "notes.onnx", b"this is not a model\n")], "notes.onnx: not "),
    "truncated model": (lambda t, m: [_write(t, "cut.onnx", m.read_bytes()[: m.stat().st_size // 2])],
                        "cut.onnx: not a valid ONNX file"),
    "random bytes": (lambda t, m: [_write(t, "noise.onnx", np.random.default_rng(0).bytes(3000))], "noise.onnx: "),
    "fails checker": (lambda t, m: [_write(t, "bad.onnx", graphs.fails_checker().SerializeToString())],
                      "bad.onnx: fails the ONNX checker"),
    "unknown pass": (lambda t, m: [m, "--passes", "nosuchpass"], "unknown pass 'nosuchpass'; valid: "),
    "misspelt pass": (lambda t, m: [m, "--passes", "cleanup,fold_bn"], "unknown pass 'fold_bn' (did you mean 'fold-bn'?)"),
    "unknown target": (lambda t, m: [m, "--target", "nosuchtarget"], "unknown target 'nosuchtarget'"),
    "misspelt target": (lambda t, m: [m, "--target", "cpux"], "unknown target 'cpux' (did you mean 'cpu'?); valid: "),
    "unknown parameter": (lambda t, m: [m, "--passes", "cleanup(fold=1)"], "cleanup: unknown parameter 'fold'"),
    "wrong type": (lambda t, m: [m, "--passes", "cleanup(max_folded_mb=big)"],
                   "cleanup: parameter max_folded_mb=big: expected a number"),
    "out of range": (lambda t, m: [m, "--passes", "cleanup(max_folded_mb=-1)"],
                     "cleanup: parameter max_folded_mb=-1 is out of range; must be in [0, inf)"),
    "spec syntax": (lambda t, m: [m, "--passes", "cleanup(("], "cannot parse spec 'cleanup(('"),
    "npz wrong names": (lambda t, m: [m, "--eval", write_npz(t, images=np.zeros((2, 1, 8, 8), np.float32),
                                                          weights=np.zeros((2, 1, 8, 8), np.float32))],
                        "no array for input(s) ['input']; the file has ['images', 'weights']"),
    "npz wrong shape": (lambda t, m: [m, "--calib", write_npz(t, input=np.zeros((2, 1, 9, 9), np.float32))],
                        "array 'input' has samples of shape [1, 1, 9, 9], but the model expects [batch, 1, 8, 8]"),
    "npz bad labels": (lambda t, m: [m, "--eval", write_npz(t, input=np.zeros((2, 1, 8, 8), np.float32),
                                                         labels=np.zeros(3, np.int64))], "'labels' must be"),
    "npz not a zip": (lambda t, m: [m, "--calib", _write(t, "x.npz", b"plain text")], "not a readable .npz file"),
    "bad input shape": (lambda t, m: [m, "--input-shape", "input=1x1xAx8"], "--input-shape 'input=1x1xAx8'"),
    "unknown input shape": (lambda t, m: [m, "--input-shape", "image=1x1x8x8"], "names unknown input(s) ['image']"),
    "dynamic dims": (lambda t, m: [_write(t, "dyn.onnx", graphs.dynamic_dims().SerializeToString())],
                     "input 'x' has dynamic dimensions [N, 3, H, W]; give them with --input-shape x=Nx3xNxN"),
    "output not writable": (lambda t, m: [m, "-o", _not_writable_output(t)], "output directory is not writable"),
    "output is a file": (lambda t, m: [m, "-o", _write(t, "taken", b"")], "exists and is not a directory"),
    "foreign output dir": (lambda t, m: [m, "-o", _foreign_dir(t)],
                           "directory is not empty and holds no squeeze report; choose another -o or pass --force"),
    "bad --threads": (lambda t, m: [m, "--threads", "0"], "--threads must be at least 1"),
    "no model": (lambda t, m: [], "the following arguments are required: model"),
    "unknown option": (lambda t, m: [m, "--pases", "cleanup"], "unrecognized arguments: --pases"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_exit_2_and_leave_the_input_alone(tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    model = Path(shutil.copy(REPO / "models" / "digits_cnn.onnx", work / "digits_cnn.onnx"))
    before = sha256(model)
    build, expected = ERRORS[case]
    args = build(work, model)
    inputs = [a for a in args if isinstance(a, Path) and a.is_file()]
    hashes = {p: sha256(p) for p in inputs}
    run = squeeze_cli(*args, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("squeeze: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in run.stderr
    assert sha256(model) == before
    assert all(sha256(p) == h for p, h in hashes.items())
    assert not (work / "digits_cnn.squeeze").exists()  # nothing was written beside the model


def test_debug_shows_the_traceback(tmp_path, digits_copy):
    run = squeeze_cli(digits_copy, "--passes", "nosuchpass", "--debug", cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" in run.stderr and "SpecError" in run.stderr


def test_forcing_a_foreign_output_dir(tmp_path, digits_copy):
    folder = _foreign_dir(tmp_path)
    run = squeeze_cli(digits_copy, "--passes", "cleanup", "--target", "none", "-o", folder, "--force", "--runs", "3",
                      cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert outputs_in(folder) == sorted(["holiday.jpg"] + REPORT_FILES)


# ------------------------------------------------------------------------------------------------- running

def test_default_output_is_model_stem_squeeze_beside_the_model(tmp_path):
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    model = Path(shutil.copy(REPO / "models" / "digits_cnn.onnx", models / "digits_cnn.onnx"))
    before = sha256(model)
    run = squeeze_cli(model, "--passes", "fold-bn", "--target", "none", "--runs", "3", cwd=elsewhere)
    assert run.returncode == 0, run.stderr
    out = models / "digits_cnn.squeeze"
    assert outputs_in(out) == REPORT_FILES
    assert sorted(p.name for p in models.iterdir()) == ["digits_cnn.onnx", "digits_cnn.squeeze"]
    assert list(elsewhere.iterdir()) == []
    assert sha256(model) == before
    assert f"wrote {out / 'model.onnx'}" in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["targets"] == [] and report["pass_spec"] == "fold-bn"
    # a second run may reuse the folder: it holds a squeeze report
    again = squeeze_cli(model, "--target", "none", "--runs", "3", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "report.json").read_text())["pass_spec"] == ""


def test_python_dash_m_and_the_console_script(tmp_path):
    run = squeeze_cli("--version", cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().startswith("squeeze ")
    run = squeeze_cli("passes", cwd=tmp_path)
    assert run.returncode == 0 and "cleanup: " in run.stdout and "fold-bn: " in run.stdout
    script = Path(sys.executable).parent / "squeeze"
    if script.exists():
        run = subprocess.run([script, "targets"], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=60)
        assert run.returncode == 0 and any(line.startswith("cpu: ") for line in run.stdout.splitlines())


def test_failing_pass_exits_2_and_keeps_the_last_good_model(tmp_path, digits_copy):
    """A pass that fails verification: the last good model and the report are still written (in-process, so a
    deliberately broken pass can be registered)."""
    import onnx_graphsurgeon as gs
    from squeeze import cli
    from squeeze.registry import PASSES, register_pass

    @register_pass("test-cli-breaks-the-model")
    def breaks(graph, ctx) -> None:
        """Adds an op that does not exist."""
        graph.nodes.append(gs.Node("NoSuchOp", inputs=[graph.outputs[0]], outputs=[gs.Variable("z", np.float32)]))
        graph.outputs = [graph.nodes[-1].outputs[0]]

    try:
        import contextlib
        import io
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main([str(digits_copy), "--passes", "fold-bn,test-cli-breaks-the-model", "--target", "none",
                             "--runs", "3", "-o", str(tmp_path / "out")])
    finally:
        PASSES.pop("test-cli-breaks-the-model", None)
    assert code == 2
    (line,) = err.getvalue().splitlines()
    assert line.startswith("squeeze: error: pass 'test-cli-breaks-the-model' failed: model fails the ONNX checker")
    assert line.endswith("(kept the last good model)")
    saved = onnx.load(tmp_path / "out" / "model.onnx")
    assert "BatchNormalization" not in graphs.op_counts(saved) and "NoSuchOp" not in graphs.op_counts(saved)


# ------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def e2e(tmp_path_factory, repo):
    """One CLI run: digits_cnn, cleanup + fold-bn, real calibration and evaluation data, TVM on the CPU."""
    work = tmp_path_factory.mktemp("cli_e2e")
    model = Path(shutil.copy(repo / "models" / "digits_cnn.onnx", work / "digits_cnn.onnx"))
    before = sha256(model)
    run = squeeze_cli(model, "--passes", "cleanup,fold-bn", "--eval", repo / "models" / "digits_test.npz",
                      "--calib", repo / "models" / "digits_calib.npz", "--target", "cpu", "--threads", "2",
                      cwd=work, timeout=600)
    out = work / "digits_cnn.squeeze"
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return {"run": run, "out": out, "report": report, "model": model, "hash_before": before}


@pytest.mark.tvm
def test_e2e_exit_and_files(e2e):
    run, out = e2e["run"], e2e["out"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "squeeze: error" not in run.stderr
    assert outputs_in(out) == REPORT_FILES
    assert sha256(e2e["model"]) == e2e["hash_before"]
    assert "cpu [native]" in run.stdout
    assert [line.split()[-5:] for line in run.stdout.splitlines() if line.startswith("top-1")] == [
        ["+0.00", "±", "0.00", "pts", "(p=1)"]]


@pytest.mark.tvm
def test_e2e_report_passes_and_accuracy(e2e):
    report = e2e["report"]
    assert report["schema"] == 1
    assert report["model"]["sha256"] == e2e["hash_before"]
    assert report["model"]["inputs"] == {"input": [1, 1, 8, 8]}
    assert report["pass_spec"] == "cleanup,fold-bn"
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold-bn"]
    assert report["data"]["calib_samples"] == 256 and report["data"]["eval_samples"] == 540
    assert report["data"]["calib_synthetic"] is False
    assert report["original"]["ops"]["BatchNormalization"] == 4
    assert "BatchNormalization" not in report["final"]["ops"]
    # 4 BN × 4 tensors of 16, 16, 16, 32 channels go; the 4 bias-free Convs gain a bias each
    assert report["original"]["param_count"] == 43_162
    assert report["final"]["param_count"] == 43_162 - 4 * (16 + 16 + 16 + 32) + (16 + 16 + 16 + 32)
    assert report["final"]["macs"] == report["original"]["macs"]
    assert report["final"]["bytes"]["file"] == (e2e["out"] / "model.onnx").stat().st_size
    assert report["original"]["bytes"]["file"] == e2e["model"].stat().st_size
    assert report["fidelity"]["max_abs_rel"] <= 1e-5 and report["fidelity"]["top1_agreement"] == 1.0
    for step in report["passes"]:
        assert step["fidelity"]["max_abs_rel"] <= 1e-5
        assert step["accuracy"]["top1"] == pytest.approx(536 / 540)
    acc = report["accuracy"]
    assert acc["original"]["top1"] == acc["final"]["top1"] == pytest.approx(536 / 540)
    assert acc["original"]["n"] == 540 and acc["drop_pts"] == 0.0
    assert report["failure"] is None
    saved = onnx.load(e2e["out"] / "model.onnx")
    assert graphs.op_counts(saved) == {"Conv": 4, "Relu": 5, "Add": 1, "Flatten": 1, "Gemm": 2}


@pytest.mark.tvm
def test_e2e_report_cpu_target(e2e):
    report = e2e["report"]
    ort = report["onnxruntime"]
    assert ort["original"]["p50"] > 0 and ort["final"]["p50"] > 0
    (cpu,) = report["targets"]
    assert "error" not in cpu, cpu.get("error")
    assert (cpu["name"], cpu["method"]) == ("cpu", "native")
    latency = cpu["latency_ms"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] and latency["runs"] >= 50
    assert cpu["original_latency_ms"]["runs"] >= 50 and cpu["original_latency_ms"]["p50"] > 0
    baseline = cpu["baseline"]
    assert (baseline["engine"], baseline["model"]) == ("onnxruntime", "original")
    assert baseline["latency_ms"] == ort["original"]
    assert cpu["speedup"] == pytest.approx(baseline["latency_ms"]["p50"] / latency["p50"], rel=1e-3)
    check = cpu["numeric_check"]
    assert check["ok"] is True and check["samples"] == 8
    assert check["max_abs_rel"] <= 1e-5 and check["top1_agreement"] == 1.0
    assert cpu["build_seconds"] > 0 and '"kind":"llvm"' in cpu["tvm_target"].replace(" ", "")
    assert report["environment"]["tvm"].startswith("0.27")


@pytest.mark.tvm
def test_e2e_report_md(e2e):
    text = (e2e["out"] / "report.md").read_text()
    assert text.startswith("# squeeze report: digits_cnn.onnx")
    assert "- passes: `cleanup,fold-bn`" in text
    assert "## Accuracy" in text and "top-1 original 99.26 % ± 0.37 (n=540), final 99.26 % ± 0.37 (n=540)" in text
    assert "McNemar b=0 c=0, p=1" in text and "evaluation data (reports only):" in text
    assert "## Passes" in text and "| `fold-bn` |" in text
    assert "## Targets" in text and "| cpu | native |" in text and " ok: max abs " in text
