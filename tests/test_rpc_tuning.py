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


@pytest.fixture(scope="module")
def arm_tools():
    from squeeze.targets.arm import Arm
    why = Arm().missing()
    if why:
        pytest.skip(why)


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
    assert on_pi.name == here.name + "-key-rpi4" and on_board.parent == tmp_path


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
