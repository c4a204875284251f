"""report.md: the per-pass table shows the packed size and bits/param that report.json records (issue 5)."""
from __future__ import annotations

import copy

import pytest

import graphs
import squeeze
from squeeze import report as report_mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """conv-bn-relu through cleanup and codebook(bits=4), no targets; report files written."""
    work = tmp_path_factory.mktemp("report")
    path = work / "tiny.onnx"
    path.write_bytes(graphs.conv_bn_relu().SerializeToString())
    out = work / "out"
    result = squeeze.compress(path, "cleanup,codebook(bits=4)", targets="", runs=1, threads=1, out_dir=out)
    assert result.ok, result.failure
    return result.report, (out / "report.md").read_text()


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table after `heading`, header row first."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return [rows[0]] + rows[2:]  # without the |---| alignment row


def test_pass_table_has_packed_size_and_bits_per_param(run):
    report, text = run
    header, *rows = _table(text, "## Passes")
    assert header[:7] == ["pass", "seconds", "size", "packed", "bits/param", "params", "MACs"]
    assert [r[0] for r in rows] == ["`cleanup`", "`codebook(bits=4)`"]
    for row, step in zip(rows, report["passes"]):
        b = step["bytes"]
        assert row[3] == report_mod._mb(b["packed"]) and row[3] != "—"
        assert row[4] == f"{b['bits_per_param']['overall']:.2f}"
    cleanup, codebook = (float(r[4]) for r in rows)
    assert cleanup > 31 and codebook < 0.6 * cleanup  # float32 weights; then 4-bit indices, codebooks, BN
    assert len({len(r) for r in [header] + rows}) == 1  # every row has every cell


def test_size_table_has_packed_rows(run):
    report, text = run
    header, *rows = _table(text, "## Size and compute")
    by_name = {r[0]: r for r in rows}
    o, f = report["original"]["bytes"], report["final"]["bytes"]
    assert by_name["packed size"][1:3] == [report_mod._mb(o["packed"]), report_mod._mb(f["packed"])]
    assert by_name["bits/param (packed)"][1:3] == [f"{o['bits_per_param']['overall']:.2f}",
                                                   f"{f['bits_per_param']['overall']:.2f}"]


def test_skipped_packing_and_failed_passes_keep_the_table_aligned(run):
    """Big models skip the packing estimate (packed None): a dash, not a crash; a failed pass row still has every
    cell."""
    report, _ = run
    report = copy.deepcopy(report)
    for stage in [report["original"], report["final"]] + report["passes"]:
        stage["bytes"] = {"onnx": stage["bytes"]["onnx"], "packed": None}
    report["passes"].append({"spec": "prune", "seconds": 0.5, "failed": "pass 'prune' failed"})
    header, *rows = _table(report_mod.markdown(report), "## Passes")
    assert [r[3:5] for r in rows[:2]] == [["—", "—"], ["—", "—"]]
    assert len({len(r) for r in [header] + rows}) == 1
    assert rows[2][7] == "**failed**"
