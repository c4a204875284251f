"""A target row whose numeric check failed (TVM's outputs differ from ONNX Runtime's) is shown as a failure in
every view: no latency, no speed-up, a FAILED marker with the rel-L2 (terminal table, report.md, report.html,
`squeeze compare`)."""
from __future__ import annotations

import json

import pytest

from helpers import cleanup_report
from squeeze import compare, html, report as report_mod

LATENCY = {"p50": 1.2345, "p90": 1.3456}
FAILED_CHECK = {"max_abs": 3.1, "rel_l2": 1.39, "max_abs_rel": 0.87, "samples": 2, "ok": False}


def _row(name: str, check: dict) -> dict:
    return {"name": name, "spec": name, "method": "native", "latency_ms": dict(LATENCY),
            "original_latency_ms": {"p50": 2.5, "p90": 2.6}, "speedup": 7.777, "numeric_check": check,
            "baseline": {"engine": "onnxruntime", "model": "original", "latency_ms": {"p50": 9.6, "p90": 9.9}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """A real report (conv-bn-relu, cleanup, no targets) given two cpu rows: one ok, one whose check failed."""
    rep = cleanup_report(tmp_path_factory.mktemp("failed_check"))
    rep["targets"] = [_row("cpu(schedules=false)", {"rel_l2": 1.6e-5, "max_abs_rel": 2e-5, "ok": True}),
                      _row("cpu", dict(FAILED_CHECK))]
    rep["targets"][1]["latency_ms"] = {"p50": 4.321, "p90": 4.5}  # the failed row's own (wrong-code) latency
    return rep


def test_failed_check_text_names_the_error():
    assert report_mod.failed_check(_row("cpu", dict(FAILED_CHECK))) == \
        "FAILED: TVM vs ONNX Runtime rel-L2 1.39, max abs rel 0.87"
    assert report_mod.failed_check(_row("cpu", {"ok": False, "error": "output shapes differ"})) == \
        "FAILED: output shapes differ"
    assert report_mod.failed_check(_row("cpu", {"rel_l2": 1e-6, "ok": True})) is None
    assert report_mod.failed_check({"name": "cpu", "latency_ms": LATENCY}) is None  # no check: not a failure


def test_terminal_table_shows_failure_instead_of_latency(report):
    lines = report_mod.terminal_table(report).splitlines()
    failed = next(ln for ln in lines if ln.startswith("cpu [native]"))
    good = next(ln for ln in lines if ln.startswith("cpu(schedules=false) [native]"))
    assert "FAILED" in failed and "rel-L2 1.39" in failed
    assert "4.321" not in failed and "2.500" not in failed and "×" not in failed
    assert "1.234 ms" in good and "2.500 ms" in good and "FAILED" not in good


def test_markdown_row_has_no_latency_or_speedup(report):
    text = report_mod.markdown(report)
    rows = [ln for ln in text.splitlines() if ln.startswith("| cpu")]
    failed = next(r for r in rows if r.startswith("| cpu |"))
    good = next(r for r in rows if r.startswith("| cpu(schedules=false) |"))
    assert "FAILED" in failed and "rel-L2 1.39" in failed
    assert "4.321" not in failed and "7.78×" not in failed and "2.500" not in failed
    assert "1.234 ms" in good and "7.78×" in good and "ok" in good
    assert len(failed.split("|")) == len(good.split("|"))  # same columns
    assert "**cpu: FAILED: TVM vs ONNX Runtime rel-L2 1.39" in text  # above the table too


def test_html_page_marks_the_failure_and_draws_no_bar(report):
    page = html.render(json.loads(json.dumps(report)))
    targets = page[page.index("Targets"):]
    assert "class='bad'><b>cpu: FAILED: TVM vs ONNX Runtime rel-L2 1.39" in targets
    assert "4.321" not in targets and "1.234" in targets  # the failed row: neither in the table nor as a bar
    bars = [r for r in report["targets"] if r.get("latency_ms") and not report_mod.failed_check(r)]
    assert [r["name"] for r in bars] == ["cpu(schedules=false)"]


def test_compare_shows_failed_instead_of_p50(report, tmp_path):
    folders = []
    for name, rows in (("a", report["targets"]), ("b", report["targets"][:1])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps({**report, "targets": rows}))
        folders.append(folder)
    table = compare.rows(folders)
    assert table[0]["cpu p50 ms [native]"].startswith("FAILED: TVM vs ONNX Runtime rel-L2 1.39")
    assert table[0]["cpu(schedules=false) p50 ms [native]"] == pytest.approx(1.2345)
    assert "FAILED" in compare.markdown_table(table)
    assert "<svg" in compare.plot_html(table)  # a FAILED cell draws no bar and does not break the plot
