"""Small helpers the test modules share (one copy each): calibration data that the passes treat as real, a real
report to add target rows to, the files a run left in its output folder, .npz files written into tmp_path, and the
functions a compiled module's `main` calls."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx

import graphs
import squeeze
from squeeze.data import Dataset


def calibration(model: onnx.ModelProto, count: int, seed: int = 0) -> Dataset:
    """`graphs.random_inputs` from a non-synthetic source, so the data-driven steps of the passes run (they skip
    synthetic noise)."""
    data = graphs.random_inputs(model, count, seed)
    return Dataset(data.arrays, None, "test calibration", data.stacked)


#: What a successful run writes into its output folder.
REPORT_FILES = ["model.onnx", "report.html", "report.json", "report.md"]


def outputs_in(folder: Path) -> list[str]:
    """The files a run left in `folder`, less the lock file; no staging folder may be left behind."""
    names = sorted(p.name for p in folder.iterdir())
    assert not any(n.startswith(".squeeze-staging-") for n in names), names
    return [n for n in names if n != ".squeeze.lock"]


def cleanup_report(work: Path) -> dict:
    """A real report to dress with target rows: conv-bn-relu through `cleanup`, no targets, saved under `work`
    (a copy, free to edit)."""
    path = work / "tiny.onnx"
    path.write_bytes(graphs.conv_bn_relu().SerializeToString())
    result = squeeze.compress(path, "cleanup", targets="", runs=1, threads=1, out_dir=work / "out")
    assert result.ok, result.failure
    return copy.deepcopy(result.report)


def write_npz(folder: Path, name: str = "data.npz", **arrays) -> Path:
    """`arrays` saved as `folder/name` (np.savez), for --calib/--val/--eval and the data loaders."""
    path = Path(folder) / name
    np.savez(path, **arrays)
    return path


def main_calls(mod) -> list[str]:
    """The names of the functions a Relax module's `main` calls, in order (call_tir PrimFuncs and fused groups)."""
    from tvm import relax  # noqa: PLC0415

    from squeeze.targets.schedules.common import is_call_tir  # noqa: PLC0415
    names = []

    def visit(expr):
        if is_call_tir(expr):
            names.append(expr.args[0].name_hint)
        elif isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar):
            names.append(expr.op.name_hint)
    relax.analysis.post_order_visit(mod["main"], visit)
    return names
