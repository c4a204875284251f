"""Devices over TVM RPC, on loopback: a real `tvm.exec.rpc_tracker` and `tvm.exec.rpc_server` started here
(127.0.0.1 only), and the cpu target measured — and tuned — through them with method=rpc: the path a Raspberry Pi
or a phone takes with `--tracker HOST:PORT --key KEY` or `--rpc HOST:PORT`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import squeeze
from squeeze.targets.remote import RemoteError, Runner

pytestmark = pytest.mark.tvm

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> subprocess.Popen:
    # Its own process group: TVM's rpc_server runs the server in a popen_worker child, which must go too.
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group this test created (start_new_session), nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            if sig == signal.SIGTERM:
                time.sleep(0.5)  # let the group's children exit, then make sure
        except subprocess.TimeoutExpired:
            continue


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one server registered with key 'local' (this machine standing in for a device)."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado: pip install -e '.[test]'")
    from tvm import rpc
    port, server_port = _free_port(), _free_port()
    procs = [_start(["tvm.exec.rpc_tracker", "--host", LOOPBACK, "--port", str(port), "--port-end", str(port + 1),
                     "--silent"])]
    try:
        _wait_port(port, procs[0])
        procs.append(_start(["tvm.exec.rpc_server", "--host", LOOPBACK, "--port", str(server_port), "--port-end",
                             str(server_port + 1), "--tracker", f"{LOOPBACK}:{port}", "--key", "local", "--silent"]))
        end = time.time() + 60
        while "local" not in rpc.connect_tracker(LOOPBACK, port).summary()["queue_info"]:
            if time.time() > end or procs[1].poll() is not None:
                raise TimeoutError("the rpc_server did not register with the tracker")
            time.sleep(0.3)
        yield port
    finally:
        for p in reversed(procs):
            _stop(p)


@pytest.fixture(scope="module")
def server():
    """A lone rpc_server for --rpc HOST:PORT."""
    port = _free_port()
    proc = _start(["tvm.exec.rpc_server", "--host", LOOPBACK, "--port", str(port), "--port-end", str(port + 1),
                   "--silent"])
    try:
        _wait_port(port, proc)
        yield port
    finally:
        _stop(proc)


def test_tracker_measures_the_cpu_target_with_method_rpc(tracker, repo, tmp_path):
    from squeeze.cli import main
    out = tmp_path / "out"
    code = main([str(repo / "models" / "digits_cnn.onnx"), "--target", "cpu", "--tracker", f"{LOOPBACK}:{tracker}",
                 "--key", "local", "--runs", "10", "-o", str(out)])
    assert code == 0
    (row,) = json.loads((out / "report.json").read_text())["targets"]
    assert row["method"] == "rpc"
    assert row["numeric_check"]["ok"] and row["numeric_check"]["max_abs"] < 1e-4
    lat = row["latency_ms"]
    assert lat["runs"] == 10 and 0 < lat["min"] <= lat["p50"] <= lat["p90"]
    assert row["tracker"] == f"{LOOPBACK}:{tracker}" and row["key"] == "local"
    assert "baseline" not in row  # ONNX Runtime on this machine is no baseline for a remote device
    assert "rpc" in (out / "report.md").read_text()


def test_rpc_server_measures_the_cpu_target(server, repo):
    import tempfile
    before = set(Path(tempfile.gettempdir()).glob("squeeze-rpc-*"))
    result = squeeze.compress(repo / "models" / "digits_cnn.onnx", "", targets="cpu", runs=5,
                              rpc=f"{LOOPBACK}:{server}")
    (row,) = result.report["targets"]
    assert row["method"] == "rpc" and row["numeric_check"]["ok"], row
    assert row["rpc"] == f"{LOOPBACK}:{server}"
    # the exported library of each measurement is removed with its folder (8 model.so folders per test run, once)
    assert set(Path(tempfile.gettempdir()).glob("squeeze-rpc-*")) <= before


def test_unreachable_device_is_a_row_error_with_a_hint(repo):
    port = _free_port()  # nothing listens there
    result = squeeze.compress(repo / "models" / "digits_cnn.onnx", "", targets="cpu", runs=3,
                              rpc=f"{LOOPBACK}:{port}")
    (row,) = result.report["targets"]
    assert "cannot reach the device" in row["error"] and "rpc_server" in row["error"]


@pytest.mark.parametrize("args, message", [
    ({"rpc": "nohost"}, "HOST:PORT"),
    ({"rpc": "h:99999"}, "HOST:PORT"),
    ({"tracker": "127.0.0.1:9190"}, "--key"),
    ({"key": "rpi"}, "--tracker"),
    ({"rpc": "a:1", "tracker": "b:2", "key": "k"}, "not both"),
])
def test_bad_device_flags_are_one_line_errors(args, message):
    with pytest.raises(RemoteError, match=message):
        Runner.from_args(**args)


def test_cli_rejects_bad_device_flags_with_exit_2(repo, capsys):
    from squeeze.cli import main
    assert main([str(repo / "models" / "digits_cnn.onnx"), "--target", "none", "--tracker", "x:1"]) == 2
    assert "--key" in capsys.readouterr().err


def test_ms_runner_points_metaschedule_at_the_device():
    from squeeze.targets.remote import ms_runner
    runner = ms_runner(Runner.from_args(tracker="127.0.0.1:9190", key="rpi4"))
    assert type(runner).__name__ == "RPCRunner"
    assert runner.rpc_config.tracker_key == "rpi4" and runner.f_create_session is None
    direct = ms_runner(Runner.from_args(rpc="127.0.0.1:9090"))  # a lone server: its own session hook
    assert (direct.rpc_config.tracker_host, direct.rpc_config.tracker_port) == ("127.0.0.1", 9090)
    assert callable(direct.f_create_session)


def test_remote_outputs_equal_local_ones(tracker, repo, tmp_path):
    """The same library run locally and through the tracker gives bit-identical outputs."""
    import onnx
    from squeeze.targets import remote
    from squeeze.targets.cpu import Cpu
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    target = Cpu()
    artifact = target.build(model, {"input": (1, 1, 8, 8)}, tmp_path)
    samples = [{"input": np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)}]
    local = target.measure(artifact, samples, runs=3).outputs
    executable, names = artifact.handle
    outputs, latency, info = remote.measure_executable(Runner.from_args(tracker=f"{LOOPBACK}:{tracker}",
                                                                        key="local"), executable, names, samples, 3)
    assert np.array_equal(outputs["0"], local["0"]) and info["key"] == "local"


@pytest.mark.parametrize("via", ["tracker", "server"])
def test_metaschedule_rpc_runner_measures_on_the_device(via, request, tmp_path):
    """What `--tune` with `--tracker`/`--rpc` relies on: MetaSchedule's RPCRunner times a candidate on the device."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms
    from squeeze.targets import tuning
    from squeeze.targets.remote import ms_runner
    a, b = te.placeholder((32, 32), name="A"), te.placeholder((32, 32), name="B")
    k = te.reduce_axis((0, 32), name="k")
    c = te.compute((32, 32), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    # exported as tuning's builder does: a shared library the server loads as it is
    artifact = tuning.library_export()(tvm.tirx.build(tvm.IRModule({"main": func}), target="llvm"))
    port = request.getfixturevalue(via)
    device = (Runner.from_args(tracker=f"{LOOPBACK}:{port}", key="local") if via == "tracker"
              else Runner.from_args(rpc=f"{LOOPBACK}:{port}"))
    runner = ms_runner(device, number=2, repeat=1, min_repeat_ms=1)
    # device_type must be a runtime device name ("cpu"), not the target kind ("llvm"): tvm.runtime.device("llvm")
    # is unknown in TVM 0.27
    (future,) = runner.run([ms.runner.RunnerInput(artifact, "cpu", ms.arg_info.ArgInfo.from_prim_func(func))])
    result = future.result()
    ms.utils.remove_build_dir(artifact)
    assert result.error_msg is None, result.error_msg
    assert 0 < float(result.run_secs[0]) < 1.0


def test_tune_through_the_tracker_measures_on_the_device_and_reuses_its_database(tracker, repo, tmp_path,
                                                                                 monkeypatch):
    """`--tune 16 --tracker --key`: the default-schedule seeds and the candidates are timed on the device (the
    local runner is made unusable), into a database named for the device; the row has the device latency untuned
    and tuned; a second identical run measures nothing new and tunes faster."""
    from tvm.s_tir import meta_schedule as ms

    from squeeze.cli import main
    from squeeze.targets import tuning

    def no_local_runner(*args, **kwargs):
        raise AssertionError("tuning through RPC must not measure on this machine")

    monkeypatch.setattr(ms.runner, "LocalRunner", no_local_runner)
    cache = tmp_path / "db"

    def run(out: Path) -> dict:
        code = main([str(repo / "models" / "digits_cnn.onnx"), "--target", "cpu", "--tune", "16", "--tracker",
                     f"{LOOPBACK}:{tracker}", "--key", "local", "--tune-cache", str(cache), "--threads", "1",
                     "--runs", "10", "-o", str(out)])
        assert code == 0
        (row,) = json.loads((out / "report.json").read_text())["targets"]
        assert "error" not in row, row["error"]
        return row

    row = run(tmp_path / "first")
    assert row["method"] == "rpc" and row["key"] == "local" and row["numeric_check"]["ok"]
    tuned = row["tuning"]
    assert tuned["measured"] == "rpc" and tuned["measured_on"] == f"tracker {LOOPBACK}:{tracker} key local"
    folder = Path(tuned["database"])
    assert folder.parent == cache and folder.name.endswith("-key-local")
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no database for this machine was made
    records = (folder / "database_tuning_record.json").read_text().splitlines()
    workloads = (folder / "database_workload.json").read_text().splitlines()
    # every workload's default schedule was timed (the search may time a seed's trace again: at least one each)
    assert {json.loads(line)[0] for line in records if tuning.DEFAULT_MARK in line} == set(range(len(workloads)))
    assert len(records) > len(workloads)  # and tuning candidates
    assert sum(f["records"] for f in tuned["functions"].values()) == len(records)
    # untuned and tuned latency side by side, both timed on the device
    assert 0 < row["untuned_latency_ms"]["p50"] and 0 < row["latency_ms"]["p50"]
    assert row["tuning_speedup"] == pytest.approx(row["untuned_latency_ms"]["p50"] / row["latency_ms"]["p50"],
                                                  rel=1e-3)
    assert any(n.startswith("tuned on the device (tracker") for n in row["notes"])
    assert 0 < tuned["kernels_us"]["tuned"] <= tuned["kernels_us"]["untuned"]

    again = run(tmp_path / "second")
    assert (folder / "database_tuning_record.json").read_text().splitlines() == records  # nothing measured anew
    assert again["tuning"]["database"] == tuned["database"]
    assert again["tuning"]["seconds"] < tuned["seconds"]
