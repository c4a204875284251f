"""The output folder under pressure: concurrent runs, interrupts (SIGINT, SIGTERM, SIGKILL), replacing squeeze's own
folder, refusing anyone else's, and never writing through a symlink or outside OUTDIR."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

import graphs
import squeeze
from squeeze import model as model_io
from squeeze.errors import OutputError
from squeeze.model import sha256
from squeeze.outdir import LOCK_NAME, STAGING_PREFIX, OutputDir

from conftest import REPO

DIGITS = REPO / "models" / "digits_cnn.onnx"


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its hash (links as their target)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = sha256(path)
    return found


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def _compress(out: Path, passes: str = "cleanup", **kw):
    return squeeze.compress(DIGITS, passes, targets="", runs=1, threads=1, out_dir=out, **kw)


def _cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "squeeze", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# ------------------------------------------------------------------------------------------------- replacing

def test_squeeze_replaces_its_own_output_folder(tmp_path):
    out = tmp_path / "out"
    _compress(out, "cleanup")
    first = json.loads((out / "report.json").read_text())
    _compress(out, "fold-bn")  # no --force needed: the folder holds squeeze's report
    second = json.loads((out / "report.json").read_text())
    assert (first["pass_spec"], second["pass_spec"]) == ("cleanup", "fold-bn")
    assert graphs.op_counts(onnx.load(out / "model.onnx"))["BatchNormalization"] == 0
    assert _visible(out) == ["model.onnx", "report.html", "report.json", "report.md"]


def test_a_report_json_squeeze_did_not_write_is_not_its_own(tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "report.json").write_text('{"quarter": 3, "revenue": 12}\n')  # someone else's report.json
    with pytest.raises(OutputError, match="holds no squeeze report"):
        _compress(out)
    assert (out / "report.json").read_text() == '{"quarter": 3, "revenue": 12}\n'
    _compress(out, force=True)
    assert json.loads((out / "report.json").read_text())["squeeze_version"]


def test_replacing_removes_the_previous_runs_external_data_but_not_a_strangers(tmp_path):
    own = tmp_path / "own"
    _compress(own)
    (own / "model.onnx.data").write_bytes(b"weights of an earlier, larger model")
    _compress(own)
    assert not (own / "model.onnx.data").exists()  # it no longer belongs to model.onnx

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.onnx.data").write_bytes(b"the user's own file")
    _compress(foreign, force=True)
    assert (foreign / "model.onnx.data").read_bytes() == b"the user's own file"


# ------------------------------------------------------------------------------------------------- concurrency

def test_a_second_run_into_a_locked_folder_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    _compress(out)
    before = _tree(out)
    fd = os.open(out / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running squeeze holds it
        with pytest.raises(OutputError, match="another squeeze run is writing to this folder"):
            _compress(out, "fold-bn")
    finally:
        os.close(fd)
    assert _tree(out) == before


def test_two_simultaneous_cli_runs_leave_one_consistent_result(tmp_path):
    out = tmp_path / "out"
    runs = {passes: _cli(DIGITS, "--passes", passes, "--target", "none", "-o", out, "--runs", "200", "--threads", "1",
                         cwd=tmp_path)
            for passes in ("cleanup", "fold-bn")}
    results = {passes: (proc.wait(timeout=300), proc.stderr.read()) for passes, proc in runs.items()}
    for proc in runs.values():
        proc.stdout.close()
        proc.stderr.close()
    codes = [code for code, _ in results.values()]
    assert 0 in codes, results
    for code, stderr in results.values():
        assert code in (0, 2), stderr
        if code == 2:
            assert stderr.strip().splitlines() == [stderr.strip()] and "another squeeze run" in stderr, stderr
    report = json.loads((out / "report.json").read_text())
    bn = graphs.op_counts(onnx.load(out / "model.onnx"))["BatchNormalization"]
    assert (report["pass_spec"], bn) in (("cleanup", 4), ("fold-bn", 0))  # model and report from the same run
    assert _visible(out) == ["model.onnx", "report.html", "report.json", "report.md"]


# ------------------------------------------------------------------------------------------------- interrupts

def _wait_for_staged_model(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has written model.onnx into its staging folder (it is then measuring latency)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((s / "model.onnx").exists() for s in out.glob(STAGING_PREFIX + "*")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("the run never staged its model")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_the_previous_outputs_intact(tmp_path, sig):
    out = tmp_path / "out"
    _compress(out)
    before = _tree(out)
    proc = _cli(DIGITS, "--passes", "fold-bn", "--target", "none", "-o", out, "--runs", "1000000", "--threads", "1",
                cwd=tmp_path)
    _wait_for_staged_model(out, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert code == 130, stderr
    assert stderr.strip().splitlines() == ["squeeze: interrupted; earlier outputs were left as they were"], stderr
    assert _tree(out) == before  # same files, same bytes, no staging folder, no temporary files
    assert sorted(os.listdir(out)) == sorted([LOCK_NAME, *_visible(out)])


def test_a_killed_run_leaves_the_previous_outputs_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    _compress(out)
    before = {k: v for k, v in _tree(out).items()}
    proc = _cli(DIGITS, "--passes", "fold-bn", "--target", "none", "-o", out, "--runs", "1000000", "--threads", "1",
                cwd=tmp_path)
    _wait_for_staged_model(out, proc)
    proc.kill()  # SIGKILL: no handler runs, the staging folder stays behind
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    assert list(out.glob(STAGING_PREFIX + "*"))
    assert {k: v for k, v in _tree(out).items() if not k.startswith(STAGING_PREFIX)} == before
    _compress(out, "fold-bn")
    assert not list(out.glob(STAGING_PREFIX + "*"))
    assert json.loads((out / "report.json").read_text())["pass_spec"] == "fold-bn"


# ------------------------------------------------------------------------------------------------- links

def test_an_output_folder_that_is_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputError, match="symbolic link"):
        _compress(tmp_path / "link")
    assert list(real.iterdir()) == []


def test_a_symlinked_output_file_refuses_the_whole_commit(tmp_path):
    out = tmp_path / "out"
    _compress(out)
    victim = tmp_path / "victim.md"
    victim.write_text("keep me")
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(victim)
    before = _tree(out)
    with pytest.raises(OutputError, match="symbolic link"):
        _compress(out, "fold-bn")
    assert victim.read_text() == "keep me"
    assert _tree(out) == before  # checked before the first file moved: model.onnx was not replaced either


def test_a_symlinked_subfolder_is_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "artifacts").symlink_to(outside)
    with OutputDir(out, force=True) as o:
        (o.staging / "artifacts" / "deep").mkdir(parents=True)
        (o.staging / "artifacts" / "deep" / "lib.so").write_bytes(b"code")
        with pytest.raises(OutputError, match="symbolic link"):
            o.commit()
    assert list(outside.iterdir()) == []  # not even the folder "deep" was created out there


def test_a_planted_staging_link_is_removed_not_followed(tmp_path):
    out = tmp_path / "out"
    _compress(out)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (out / f"{STAGING_PREFIX}99999").symlink_to(precious)
    _compress(out, "fold-bn")
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert not list(out.glob(STAGING_PREFIX + "*"))


def test_hostile_names_in_the_model_never_name_an_output_file(tmp_path, monkeypatch):
    """Tensor names like ../../x and /etc/passwd, saved as a model with external data: files go only into OUTDIR."""
    from robustness import models
    monkeypatch.setattr(model_io, "_EXTERNAL_DATA_THRESHOLD", 1)  # every model takes the external-data path
    monkeypatch.setattr(model_io, "_LARGE_TENSOR_BYTES", 16)
    work = tmp_path / "work"
    work.mkdir()
    result = squeeze.compress(models.hostile_names(), "cleanup", targets="", runs=1, threads=1, out_dir=work / "out")
    assert result.ok, result.failure
    assert sorted(os.listdir(tmp_path)) == ["work"]
    assert sorted(os.listdir(work)) == ["out"]
    assert _visible(work / "out") == ["model.onnx", "model.onnx.data", "report.html", "report.json", "report.md"]
    saved = onnx.load(work / "out" / "model.onnx", load_external_data=False)
    locations = {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
