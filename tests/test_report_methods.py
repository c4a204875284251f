"""Figures that are not device time (emulated, opencl-cpu, instruction-count) are shown apart from native/rpc ones in
every view: their own table in the terminal, report.md, report.html and `squeeze compare`, their own plot axis, a
label that says what the figure is, and no speed-up or ratio (report.json carries none either)."""
from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest

from helpers import cleanup_report
from squeeze import api, compare, html, report as report_mod
from squeeze.targets.base import Artifact, Measurement

# Figures chosen so that each appears once and can be searched for: native 1.234 / 2.500 ms, emulated 37.777 /
# 55.555 ms, 4.32 M / 6.54 M instructions.
NATIVE = {"name": "cpu", "spec": "cpu", "method": "native", "latency_ms": {"p50": 1.2345, "p90": 1.3},
          "original_latency_ms": {"p50": 2.5, "p90": 2.6}, "speedup": 7.777, "speedup_vs_original_tvm": 2.025,
          "numeric_check": {"max_abs": 1e-6, "rel_l2": 1e-6, "ok": True},
          "baseline": {"engine": "onnxruntime", "model": "original", "latency_ms": {"p50": 9.6, "p90": 9.9}}}
EMULATED = {"name": "arm", "spec": "arm", "method": "emulated", "latency_ms": {"p50": 37.777, "p90": 40.0},
            "original_latency_ms": {"p50": 55.555, "p90": 60.0}, "no_speedup": "emulated",
            "numeric_check": {"max_abs": 1e-6, "rel_l2": 1e-6, "ok": True}}
COUNTED = {"name": "mcu", "spec": "mcu", "method": "instruction-count", "latency_ms": None,
           "instructions": 4_321_000, "original_instructions": 6_543_000, "flash_bytes": 90_000,
           "original_flash_bytes": 120_000, "ram_bytes": 20_000, "original_ram_bytes": 20_000,
           "numeric_check": {"max_abs": 1e-6, "rel_l2": 1e-6, "ok": True}}
POCL = {"name": "mobile_gpu", "spec": "mobile_gpu", "method": "opencl-cpu", "latency_ms": None,
        "numeric_check": {"max_abs": 1e-6, "rel_l2": 1e-6, "ok": True}}
APART_FIGURES = ("37.777", "55.555", "4.32", "6.54")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """A real report (conv-bn-relu, cleanup, no targets) given a native, an emulated, an instruction-count and an
    opencl-cpu row."""
    rep = cleanup_report(tmp_path_factory.mktemp("methods"))
    rep["targets"] = [copy.deepcopy(r) for r in (NATIVE, EMULATED, COUNTED, POCL)]
    return json.loads(json.dumps(rep))


def _tables(text: str) -> list[str]:
    """Markdown tables: runs of consecutive lines that start with `|`."""
    return ["\n".join(block) for block in _runs(text.splitlines())]


def _runs(lines: list[str]) -> list[list[str]]:
    blocks: list[list[str]] = []
    for prev, line in zip([""] + lines, lines):
        if line.startswith("|"):
            if not prev.startswith("|"):
                blocks.append([])
            blocks[-1].append(line)
    return blocks


def _apart_only(tables: list[str]) -> None:
    """No table holds both the native figure and an apart figure; the apart figures are in a table with no ratio."""
    native = [t for t in tables if "1.234" in t]
    apart = [t for t in tables if any(x in t for x in ("37.777", "4.32 M"))]
    assert native and apart
    for t in native:
        assert not any(x in t for x in APART_FIGURES), t
        assert "emulated" not in t and "instruction-count" not in t and "opencl-cpu" not in t, t
    for t in apart:
        assert "×" not in t and "speed-up" not in t, t
        assert "1.234" not in t and "2.500" not in t, t


def test_labels_say_what_the_figure_is():
    assert report_mod.method_label("native") == "native"
    assert report_mod.method_label("emulated") == "emulated — qemu time, not device time"
    assert report_mod.method_label("instruction-count") == "instruction-count — QEMU instructions, not cycles"
    assert report_mod.no_speedup_reason("rpc") is None
    assert "qemu time, not device time" in report_mod.no_speedup_reason("emulated")


def test_terminal_puts_apart_figures_in_their_own_table_with_no_ratio(report):
    text = report_mod.terminal_table(report)
    main, apart = text.split("\n\n")
    assert "cpu [native]" in main and "1.234 ms" in main and "2.03×" in main
    assert not any(x in main for x in APART_FIGURES) and "emulated" not in main
    assert "mcu flash" in main and "1.33×" in main  # flash is a byte size from the ELF: an honest ratio
    lines = apart.splitlines()
    assert lines[0].split() == ["not", "device", "time", "(no", "ratio)", "original", "final"]
    arm = next(ln for ln in lines if ln.startswith("arm [emulated — qemu time, not device time]"))
    assert arm.split()[-4:] == ["55.555", "ms", "37.777", "ms"]
    mcu = next(ln for ln in lines if ln.startswith("mcu [instruction-count — QEMU instructions, not cycles]"))
    assert mcu.split()[-4:] == ["6.54", "M", "4.32", "M"]
    assert any(ln.startswith("mobile_gpu [opencl-cpu") for ln in lines)
    assert "×" not in apart


def test_markdown_has_a_separate_not_device_time_table(report):
    text = report_mod.markdown(report)
    targets = text[text.index("## Targets"):]
    _apart_only(_tables(targets))
    assert "### Not device time" in targets
    assert "| arm | emulated — qemu time, not device time | 37.777 ms (p90 40.000) | 55.555 ms (p90 60.000) |" in text
    assert "| mcu | instruction-count — QEMU instructions, not cycles | 4.32 M instructions | 6.54 M instructions |" \
        in text
    assert "| mobile_gpu | opencl-cpu — PoCL on this CPU: outputs checked, no time | — (outputs checked only) |" in text
    assert "| cpu | native | 1.234 ms (p90 1.300) | 2.500 ms (p90 2.600) | 9.600 ms (p90 9.900) | 7.78× |" in text


def test_html_draws_apart_figures_on_their_own_axes_and_table(report):
    page = html.render(report)
    targets = page[page.index("id='targets'"):page.index("id='fidelity'")]
    svgs = re.findall(r"<svg.*?</svg>", targets, re.S)
    native = [s for s in svgs if "cpu [native]" in s]
    emulated = [s for s in svgs if "arm [emulated]" in s]
    counted = [s for s in svgs if "mcu [instruction-count]" in s]
    assert len(native) == len(emulated) == len(counted) == 1
    assert "onnxruntime [native]" in native[0] and "real time" in native[0]
    assert "arm" not in native[0] and "mcu" not in native[0]
    assert "cpu [native]" not in emulated[0] + counted[0] and "onnxruntime" not in emulated[0] + counted[0]
    assert "qemu time, not device time" in emulated[0] and "QEMU instructions, not cycles" in counted[0]
    tables = re.findall(r"<table>.*?</table>", targets, re.S)
    native_t = [t for t in tables if ">cpu<" in t]
    apart_t = [t for t in tables if ">arm<" in t or ">mcu<" in t]
    assert len(native_t) == 1 and len(apart_t) == 1 and native_t != apart_t
    assert "emulated" not in native_t[0] and "37.78" not in native_t[0]
    assert "speed-up" not in apart_t[0] and "1.234" not in apart_t[0] and "37.777 ms" in apart_t[0]


def test_compare_keeps_apart_columns_in_their_own_table_and_axes(report, tmp_path):
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps(report))
        folders.append(folder)
    table = compare.rows(folders)
    assert table[0]["cpu p50 ms [native]"] == pytest.approx(1.2345)
    assert table[0]["arm p50 ms [emulated — qemu time, not device time]"] == pytest.approx(37.777)
    assert table[0]["mcu instructions [instruction-count — QEMU instructions, not cycles]"] == 4_321_000
    main, apart = compare.split_columns(table)
    assert "cpu p50 ms [native]" in main and not any(compare.apart_method(k) for k in main)
    assert apart[:2] == ["run", "passes"] and {compare.apart_method(k) for k in apart[2:]} == \
        {"emulated", "instruction-count", "opencl-cpu"}
    md_tables = _tables(compare.markdown_table(table))
    assert len(md_tables) == 2
    assert "native" in md_tables[0] and not any(m in md_tables[0] for m in ("emulated", "instruction-count"))
    assert "emulated" in md_tables[1] and "native" not in md_tables[1]
    page = compare.plot_html(table)
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 3  # accuracy/size + real latency; emulated; instruction count
    assert "[native]" in svgs[0] and "emulated" not in svgs[0] and "instruction" not in svgs[0]
    assert "[emulated" in svgs[1] and "[native]" not in svgs[1]
    assert "[instruction-count" in svgs[2] and "[native]" not in svgs[2]


def _fake_call(method: str, latency: dict | None):
    """A registry call whose target builds nothing and measures `method` with `latency` (original: twice as slow)."""
    class Fake:
        host_native = method == "native"
        runner = None

        def missing(self):
            return None

        def build(self, model, shapes, workdir):
            return Artifact(target="fake", handle=model)

        def measure(self, artifact, samples, runs):
            slow = artifact.handle == "original"
            scaled = None if latency is None else {k: v * (2 if slow else 1) for k, v in latency.items()}
            return Measurement(method, latency_ms=scaled)

    return SimpleNamespace(name="fake", params={}, entry=SimpleNamespace(obj=Fake))


@pytest.mark.parametrize("method,speedup", [("native", True), ("rpc", True), ("emulated", False),
                                            ("instruction-count", False)])
def test_report_json_has_no_speedup_from_emulated_time(method, speedup, monkeypatch, tmp_path):
    import squeeze.targets.tvm_build as tvm_build
    monkeypatch.setattr(tvm_build, "set_threads", lambda n: None)
    ort = {"original": {"p50": 4.0, "p90": 4.0}, "final": {"p50": 3.0, "p90": 3.0}}
    row = api._run_target(_fake_call(method, {"p50": 1.0, "p90": 1.1}), "original", "final", {}, [{}], tmp_path,
                          1, ort, True, 1, lambda *_: None)
    assert row["method"] == method and "error" not in row, row
    assert row["original_latency_ms"]["p50"] == 2.0  # both times are kept, each labelled by the method
    if speedup:
        assert row["speedup_vs_original_tvm"] == 2.0 and "no_speedup" not in row
    else:
        assert "speedup_vs_original_tvm" not in row and "speedup" not in row
        assert "not device time" in row["no_speedup"] or "not cycles" in row["no_speedup"]
