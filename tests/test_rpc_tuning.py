"""Tuning on a device (`--tune N` with `--rpc`/`--tracker`), the parts that need no device: databases kept per
device, candidates cross-linked for aarch64 by the builder, the arm target's wiring, and the one-line answers
when tuning cannot measure (no device for arm; a device that times nothing). The loopback end-to-end run, with a
real tracker and server, is in test_rpc.py."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from squeeze.errors import TargetError
from squeeze.targets import tuning, tvm_build
from squeeze.targets.remote import Runner

pytestmark = pytest.mark.tvm

EM_AARCH64 = 183


def _digits(repo: Path) -> onnx.ModelProto:
    return onnx.load(repo / "models" / "digits_cnn.onnx")


def test_databases_are_kept_per_device(tmp_path):
    tvm = tvm_build.tvm()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cortex-a72", "mtriple": "aarch64-linux-gnu"})
    here = tuning.database_dir(tmp_path, target, 4)
    pi = Runner.from_args(tracker="10.0.0.1:9190", key="rpi4")
    board = Runner.from_args(rpc="[fe80::1]:9090")
    assert pi.identity() == "key-rpi4" and board.identity() == "rpc-fe80__1-9090"
    on_pi = tuning.database_dir(tmp_path, target, 4, pi.identity())
    on_board = tuning.database_dir(tmp_path, target, 4, board.identity())
    assert len({here, on_pi, on_board}) == 3
    assert on_pi.name.endswith("-t4-key-rpi4") and on_board.parent == tmp_path
    assert on_pi.name.split("-")[:2] == here.name.split("-")[:2]  # the same target, another device


def test_a_runner_without_a_device_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="device="):
        tuning.tune(None, None, trials=8, cache=tmp_path, threads=1, runner=object())


def test_arm_candidates_are_cross_linked_for_aarch64(arm_tools):
    """The builder arm tuning uses: a candidate comes out as an aarch64 shared object, ready for the device."""
    tvm = tvm_build.tvm()
    from tvm import te
    from tvm.s_tir import meta_schedule as ms
    from squeeze.targets.arm import CROSS_CXX, Arm
    a = te.placeholder((64,), name="A")
    func = te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2.0, name="B")])
    builder = ms.builder.LocalBuilder(max_workers=1, f_build=tuning._build,
                                      f_export=tuning.library_export(CROSS_CXX), timeout_sec=120)
    (result,) = builder.build([ms.builder.BuilderInput(tvm.IRModule({"main": func}), Arm().tvm_target())])
    assert result.error_msg is None, result.error_msg
    head = Path(result.artifact_path).read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[16] == 3 and int.from_bytes(head[18:20], "little") == EM_AARCH64
    tuning._remove_artifacts([result])
    assert not Path(result.artifact_path).parent.exists()


def test_arm_tunes_on_the_device_with_the_cross_compiler(arm_tools, repo, tmp_path, monkeypatch):
    """With a device, arm hands tuning its runner and aarch64-linux-gnu-g++, builds the tuned library with the
    database, and keeps the untuned one (the build without --tune) to time beside it."""
    from squeeze.targets import arm as arm_mod
    calls = []

    def fake_tune_model(mod, target, **kwargs):
        calls.append(kwargs)
        return None, {"trials": kwargs["trials"], "measured": "rpc"}

    monkeypatch.setattr(tuning, "tune_model", fake_tune_model)
    target = arm_mod.Arm(tune=8, tune_cache=str(tmp_path / "db"))
    target.runner = Runner.from_args(tracker="127.0.0.1:9", key="rpi4")
    artifact = target.build(_digits(repo), {"input": (1, 1, 8, 8)}, tmp_path)
    (kwargs,) = calls
    assert kwargs["device"] is target.runner and kwargs["cross_compiler"] == arm_mod.CROSS_CXX
    assert kwargs["trials"] == 8 and kwargs["tune_cache"] == str(tmp_path / "db")
    assert artifact.info["tuning"]["measured"] == "rpc"
    for key in ("library", "untuned_library"):
        head = artifact.handle[key].read_bytes()[:20]
        assert int.from_bytes(head[18:20], "little") == EM_AARCH64
    assert artifact.handle["untuned_library"].name == "model-untuned.so"


def test_arm_without_a_device_says_tuning_is_skipped(arm_tools, repo, tmp_path):
    import squeeze
    result = squeeze.compress(repo / "models" / "digits_cnn.onnx", "", targets="arm", runs=3, tune=8,
                              tune_cache=str(tmp_path / "db"))
    (row,) = result.report["targets"]
    assert row["method"] == "emulated" and row["numeric_check"]["ok"], row
    note = row["notes"][0]
    assert note.startswith("tune=8 skipped") and "--rpc/--tracker" in note and "\n" not in note
    assert "tuning" not in row and not (tmp_path / "db").exists()


def test_a_device_that_times_nothing_is_one_line_error(tmp_path):
    """Every seed fails on the device (here: a runner that answers errors): tuning stops with the device's reason
    instead of ranking tasks without times."""
    tvm = tvm_build.tvm()
    from tvm.s_tir import meta_schedule as ms
    import graphs
    from squeeze.data import input_specs, resolve_shapes

    class Failing:
        def run(self, inputs):
            return [type("F", (), {"result": lambda self: ms.runner.RunnerResult(
                None, "RPCRunner: An exception occurred\nTraceback (most recent call last):\n  File \"x\"\n"
                      "RuntimeError: cannot load candidate.so: wrong ELF machine")})() for _ in inputs]

    g = graphs.Builder(11)
    g.node("Relu", [g.conv("x", "conv", 4, 8, pads=[1, 1, 1, 1])], "y")
    model = g.model({"x": [1, 4, 8, 8]}, "y")
    mod = tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {}))
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    with pytest.raises(TargetError, match="no default schedule could be measured on key-rpi4: RuntimeError: "
                                          "cannot load candidate.so: wrong ELF machine$"):
        tuning.tune(mod, target, trials=0, cache=tmp_path, threads=1, runner=Failing(), device="key-rpi4",
                    export=tuning.library_export())


# ------------------------------------------------------------------------------------ several devices, one key

@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    """A tracker with two loopback rpc_servers under key 'pair'; each server logs to its own file, so a test
    can tell which server loaded which candidate. Yields (tracker port, [log paths])."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado: pip install -e '.[test]'")
    import subprocess
    import sys
    import time

    from test_rpc import LOOPBACK, _free_port, _start, _stop, _wait_port
    from tvm import rpc

    from squeeze.targets.remote import registered
    logs = [tmp_path_factory.mktemp("servers") / f"server{i}.log" for i in range(2)]
    port = _free_port()
    procs = [_start(["tvm.exec.rpc_tracker", "--host", LOOPBACK, "--port", str(port), "--port-end", str(port + 1),
                     "--silent"])]
    try:
        _wait_port(port, procs[0])
        for log in logs:
            server_port = _free_port()
            with open(log, "w") as out:  # not --silent: the server logs every module it loads
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tvm.exec.rpc_server", "--host", LOOPBACK, "--port", str(server_port),
                     "--port-end", str(server_port + 1), "--tracker", f"{LOOPBACK}:{port}", "--key", "pair"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        end = time.time() + 90
        while registered(rpc.connect_tracker(LOOPBACK, port).summary(), "pair") < 2:
            if time.time() > end or any(p.poll() is not None for p in procs):
                raise TimeoutError("the two rpc_servers did not register with the tracker")
            time.sleep(0.3)
        yield port, logs
    finally:
        for p in reversed(procs):
            _stop(p)


def _candidates(count: int):
    """`count` copies of one compiled 64×64 matmul, exported as tuning's builder exports a candidate."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms
    a, b = te.placeholder((64, 64), name="A"), te.placeholder((64, 64), name="B")
    k = te.reduce_axis((0, 64), name="k")
    func = te.create_prim_func([a, b, te.compute((64, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k),
                                                 name="C")])
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target="llvm")
    args = ms.arg_info.ArgInfo.from_prim_func(func)
    return [ms.runner.RunnerInput(tuning.library_export()(lib), "cpu", args) for _ in range(count)]


def test_a_tracker_key_with_two_devices_gets_two_runner_workers(two_devices, monkeypatch):
    port, _ = two_devices
    from tvm.s_tir.meta_schedule import runner as ms_runners

    from squeeze.targets.remote import ms_runner
    device = Runner.from_args(tracker=f"127.0.0.1:{port}", key="pair")
    assert device.devices() == 2
    made = []
    monkeypatch.setattr(ms_runners, "RPCRunner", lambda **kwargs: made.append(kwargs))
    ms_runner(device)
    ms_runner(Runner.from_args(rpc="127.0.0.1:1"))
    assert [m["max_workers"] for m in made] == [2, 1]
    assert Runner.from_args(rpc="127.0.0.1:1").devices() == 1  # a lone server is one device, never asked


def test_candidates_are_measured_on_both_devices_in_parallel(two_devices):
    """A batch of candidates through the tracker: every one is timed, both servers load candidates, and the
    batch takes less wall time with one worker per device than with one worker (the report gives the ratio)."""
    import time

    from tvm.s_tir import meta_schedule as ms

    from squeeze.targets.remote import ms_runner
    port, logs = two_devices
    device = Runner.from_args(tracker=f"127.0.0.1:{port}", key="pair")

    def batch(workers: int) -> float:
        runner = ms_runner(device, number=1, repeat=4, min_repeat_ms=100, workers=workers)
        timed = 0.0
        for count in (workers, 8):  # the first batch starts the runner's worker processes; the second is timed
            inputs = _candidates(count)
            start = time.perf_counter()
            results = [f.result() for f in runner.run(inputs)]
            timed = time.perf_counter() - start
            for inp in inputs:
                ms.utils.remove_build_dir(inp.artifact_path)
            assert all(r.error_msg is None and r.run_secs for r in results), [r.error_msg for r in results]
        return timed

    before = [log.read_text().count("load_module") for log in logs]
    serial, parallel = batch(1), batch(2)
    loaded = [log.read_text().count("load_module") - b for log, b in zip(logs, before)]
    assert sum(loaded) >= 19 and min(loaded) >= 1, loaded  # both devices measured candidates
    print(f"8 candidates: one worker {serial:.2f} s, one per device (2) {parallel:.2f} s, "
          f"{serial / parallel:.2f}x")
