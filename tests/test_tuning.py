"""Cached MetaSchedule tuning (targets/tuning.py, `--tune`): a tiny graph tunes in seconds into a JSON database
in the cache folder, the default schedules and measured variants are in it as records, the tuned build agrees
with ONNX Runtime, and a second run with the same budget reuses the database instead of tuning again."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import graphs
from squeeze import runtime
from squeeze.data import input_specs, resolve_shapes
from squeeze.targets import tuning, tvm_build

pytestmark = pytest.mark.tvm


def tiny() -> "onnx.ModelProto":  # noqa: F821
    """x[1,8,8,8] ─ Conv 8→16 3×3 pad 1 ─ Relu ─ Flatten ─ Gemm 1024→10 ─ y"""
    g = graphs.Builder(11)
    h = g.node("Relu", [g.conv("x", "conv", 8, 16, pads=[1, 1, 1, 1])], "relu")
    h = g.node("Flatten", [h], "flat", axis=1)
    g.node("Gemm", [h, g.weight("fc.w", 10, 1024), g.weight("fc.b", 10)], "y", transB=1)
    return g.model({"x": [1, 8, 8, 8]}, "y")


def test_cache_dir_defaults_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("SQUEEZE_CACHE", raising=False)
    assert tuning.cache_dir() == Path.home() / ".cache" / "squeeze" / "tuning"
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "c"))
    assert tuning.cache_dir() == tmp_path / "c" / "tuning"
    assert tuning.cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_budget_follows_the_latency_share():
    tasks = [tuning.Task("big", 1, None, default_us=90.0), tuning.Task("twice", 2, None, default_us=4.5),
             tuning.Task("tiny", 1, None, default_us=1.0)]
    tuning.plan_budget(tasks, 100)
    assert [t.budget for t in tasks] == [90, 9, 0]  # tiny: 1 % of the time, under MIN_TRIALS
    tuning.plan_budget(tasks, 10)
    assert [t.budget for t in tasks] == [10, 0, 0]  # no share reaches MIN_TRIALS: all to the slowest


def test_tune_tiny_graph_then_reuse(tmp_path):
    tvm = tvm_build.tvm()
    from squeeze.targets import schedules
    model = tiny()
    shapes = resolve_shapes(input_specs(model), {})
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    mod = tvm_build.import_onnx(model, shapes)

    start = time.perf_counter()
    database = tuning.tune(mod, target, trials=16, cache=tmp_path, threads=1)
    first = time.perf_counter() - start
    folder = tuning.database_dir(tmp_path, target, 1)
    records = (folder / "database_tuning_record.json").read_text().splitlines()
    workloads = (folder / "database_workload.json").read_text().splitlines()
    assert len(workloads) >= 2  # conv, dense (and the flatten between them)
    # every workload's default schedule was timed (the search may time a seed's trace again: at least one each)
    assert {json.loads(line)[0] for line in records if tuning.DEFAULT_MARK in line} == set(range(len(workloads)))
    assert len(records) > len(workloads)  # and tuned candidates: the rules' variants first
    assert all(json.loads(line) for line in records)

    executable = tvm_build.compile_module(mod, target, schedules.build_pipeline(target, database))
    data = graphs.random_inputs(model, count=2, seed=4)
    runner = tvm_build.VMRunner(executable, tvm.cpu(), ["x"])
    got = np.stack([runner.run(s)[0] for s in data.samples(2)])
    ref = runtime.run(model, data)["y"]
    assert np.abs(got.reshape(ref.shape) - ref).max() <= 1e-4 * np.abs(ref).max()

    start = time.perf_counter()
    tuning.tune(mod, target, trials=16, cache=tmp_path, threads=1)
    again = time.perf_counter() - start
    assert (folder / "database_tuning_record.json").read_text().splitlines() == records  # nothing new
    assert again < first


def test_cli_tune_flags_reach_the_cpu_target(tmp_path, digits_copy):
    """`--tune 0 --tune-cache DIR` parse and build; 0 trials means default schedules and no database."""
    from squeeze.cli import main
    out = tmp_path / "out"
    code = main([str(digits_copy), "--target", "cpu", "--tune", "0", "--tune-cache", str(tmp_path / "db"),
                 "--threads", "1", "--runs", "3", "-o", str(out)])
    assert code == 0
    row = json.loads((out / "report.json").read_text())["targets"][0]
    assert row["schedules"] == "squeeze" and "tuning" not in row
    assert not (tmp_path / "db").exists()


def test_seeds_are_planned_for_the_tuned_thread_count(tmp_path, monkeypatch):
    """Default-schedule seeds are replayed as tuned schedules: at threads=1 they must be built for one thread
    (no parallel loops), and records of older schedule rules live in another database."""
    tvm = tvm_build.tvm()
    from squeeze.targets.schedules import common, pipeline
    model = tiny()
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    mod = tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {}))
    seen = []
    monkeypatch.setattr(tuning, "_seed", lambda *args, **kwargs: seen.append(common._THREADS.get()))
    for threads in (1, 2):
        tuning.tune(mod, target, trials=0, cache=tmp_path, threads=threads)
    assert seen == [1, 2]
    now = tuning.database_dir(tmp_path, target, 1)
    monkeypatch.setattr(tuning, "host_model", lambda: "another CPU")  # the same -mcpu on another machine
    other_host = tuning.database_dir(tmp_path, target, 1)
    assert other_host != now
    monkeypatch.setattr(tvm, "__version__", tvm.__version__ + ".other")  # records made by another TVM
    other_tvm = tuning.database_dir(tmp_path, target, 1)
    assert other_tvm not in (now, other_host)
    monkeypatch.setattr(pipeline, "SCHEDULES_VERSION", pipeline.SCHEDULES_VERSION + 1)
    assert tuning.database_dir(tmp_path, target, 1) not in (now, other_host, other_tvm)


def test_a_tuned_record_replays_the_peeled_default_schedule(tmp_path):
    """A tuning record keeps a schedule as its trace, replayed on the workload at build time. The default schedules
    peel partial tiles through a block annotation the trace records (`peel_partial_tiles`); rewriting the function
    instead left the trace empty, so a depthwise conv's record replayed as the unscheduled loop nest."""
    tvm = tvm_build.tvm()
    from tvm import relax, tirx

    from squeeze.targets import schedules
    from squeeze.targets.schedules.common import PEEL
    g = graphs.Builder(5)
    g.node("Relu", [g.conv("x", "dw", 8, 8, k=3, group=8, pads=[1, 1, 1, 1])], "y")
    model = g.model({"x": [1, 8, 20, 19]}, "y")
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    mod = tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {}))
    database = tuning.tune(mod, target, trials=0, cache=tmp_path, threads=1)
    with target, database:
        tuned = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(schedules.fused_module(mod, target))
    texts = [f.script() for _, f in tuned.functions_items() if isinstance(f, tirx.PrimFunc)]
    dw = [t for t in texts if "depthwise" in t]
    assert dw and all(PEEL in t and "T.vectorized" in t for t in dw), dw
