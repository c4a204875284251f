"""report.html: self-contained, every section present; the slow test opens it in headless Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import squeeze
from squeeze.html import SECTIONS

from conftest import REPO

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "run"
    result = squeeze.compress(REPO / "models/digits_cnn.onnx", "cleanup,fold-bn", eval=REPO / "models/digits_test.npz",
                              targets="", out_dir=out, max_drop=1.0)
    assert result.ok
    return out


def test_page_is_self_contained_with_every_section(report_dir):
    page = (report_dir / "report.html").read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in page
    assert page.count("<svg") >= 2                                   # plots are inline SVG
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)  # nothing fetched from a network
    assert "<script" not in page


def test_report_command_rerenders(report_dir):
    (report_dir / "report.html").unlink()
    from squeeze.cli import main
    assert main(["report", str(report_dir)]) == 0
    assert "id='pipeline'" in (report_dir / "report.html").read_text()


def test_compare_two_runs(report_dir, tmp_path, capsys):
    other = tmp_path / "plain"
    squeeze.compress(REPO / "models/digits_cnn.onnx", "", targets="", out_dir=other)
    from squeeze.cli import main
    assert main(["compare", str(report_dir), str(other), "--html", str(tmp_path / "c.html")]) == 0
    table = capsys.readouterr().out
    assert "cleanup,fold-bn" in table and "(none)" in table
    assert "<svg" in (tmp_path / "c.html").read_text()


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not path:
        pytest.skip("Chromium not installed: run scripts/install-toolchains.sh report")
    return path


def _open_in_chromium(page, tmp_path) -> str:
    result = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_chromium_renders_every_section(report_dir, tmp_path):
    dom = _open_in_chromium(report_dir / "report.html", tmp_path)
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    assert dom.count("<svg") >= 2


@pytest.mark.slow
def test_chromium_guarded_resnet_run(corpus, tmp_path):
    """The issue's run: prune + codebook on resnet4b under --max-drop 1.0; the page opens with every section."""
    from squeeze.registry import all_passes
    if not {"prune", "codebook"} <= set(all_passes()):
        pytest.skip("prune/codebook passes not available")
    calib, test = corpus.split(corpus.dataset("cifar10_resnet4b"), 256)
    out = tmp_path / "resnet"
    result = squeeze.compress(corpus.model_path("cifar10_resnet4b"), "prune(ratio=0.5,scope=layer),codebook(bits=3)",
                              calib=calib, eval=test, targets="cpu", out_dir=out, max_drop=1.0, runs=10)
    # the guard chooses on the validation split and holds there; the evaluation split only reports, so its drop is
    # the limit give or take its standard error (CI measured 1.31 on the 761 evaluation images)
    guards = [s["guard"] for s in result.report["passes"] if s.get("guard")]
    assert guards and all(g["drop"] <= g["max_drop"] + 1e-9 for g in guards if g["action"] != "reverted"), guards
    assert any(g["action"] not in (None, "none") for g in guards)
    acc = result.report["accuracy"]
    assert acc["drop_pts"] <= 1.0 + 3 * acc["drop_stderr_pts"], acc
    dom = _open_in_chromium(out / "report.html", tmp_path)
    for section in SECTIONS:
        assert f'id="{section}"' in dom
