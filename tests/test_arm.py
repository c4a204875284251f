"""The `arm` target: an aarch64 shared library cross-linked by export_library, and — without a device — the same
kernels linked with squeeze's standalone entry point into a static aarch64 executable run under qemu-aarch64.

Tests that cross-compile skip with the install hint when the toolchain is missing.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from squeeze.errors import TargetError
from squeeze.targets import toolchains
from squeeze.targets.arm import Arm

pytestmark = pytest.mark.tvm

EM_AARCH64 = 183


@pytest.fixture(scope="module")
def digits_arm(arm_tools, tmp_path_factory):
    from conftest import REPO
    model = onnx.load(REPO / "models" / "digits_cnn.onnx")
    rng = np.random.default_rng(1)
    samples = [{"input": rng.random((1, 1, 8, 8), dtype=np.float32)} for _ in range(3)]
    target = Arm(cpu="cortex-a72")
    artifact = target.build(model, {"input": (1, 1, 8, 8)}, tmp_path_factory.mktemp("arm"))
    sess = ort.InferenceSession(model.SerializeToString())
    expected = np.stack([sess.run(None, s)[0] for s in samples])
    return artifact, target.measure(artifact, samples, runs=5), expected


def test_library_is_an_aarch64_shared_object(digits_arm):
    artifact, _, _ = digits_arm
    lib = artifact.handle["library"]
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[16] == 3  # ET_DYN
    assert int.from_bytes(head[18:20], "little") == EM_AARCH64
    assert artifact.info["library_bytes"] == lib.stat().st_size
    assert '"mcpu":"cortex-a72"' in artifact.info["tvm_target"].replace(" ", "")


def test_emulated_outputs_match_onnx_runtime(digits_arm):
    _, measured, expected = digits_arm
    assert measured.method == "emulated"
    assert measured.outputs["0"].shape == expected.shape
    assert float(np.abs(measured.outputs["0"] - expected).max()) < 1e-4
    assert any("NOT representative" in n for n in measured.notes)
    assert measured.extra["representative_timing"] is False
    # the executable runs the library's own kernel object, not a re-lowering
    assert any("from model.so" in n for n in measured.notes)


def test_target_presets():
    tvm_target = Arm().tvm_target()
    assert tvm_target.attrs["mtriple"] == "aarch64-linux-gnu" and "+neon" in list(tvm_target.attrs["mattr"])
    assert Arm(tag="raspberry-pi/4b-aarch64").tvm_target().attrs["mcpu"] == "cortex-a72"
    with pytest.raises(TargetError, match="not an aarch64"):
        Arm(tag="nvidia/nvidia-a100").tvm_target()
    with pytest.raises(TargetError, match="unknown TVM target tag"):
        Arm(tag="no/such-board").tvm_target()


def test_missing_toolchain_is_a_report_row_not_a_traceback(monkeypatch, tmp_path):
    import squeeze
    from conftest import REPO
    monkeypatch.setattr(toolchains.shutil, "which", lambda name: None)
    result = squeeze.compress(REPO / "models" / "digits_cnn.onnx", "", targets="arm", runs=3)
    (row,) = result.report["targets"]
    assert "aarch64-linux-gnu-gcc" in row["error"] and "install-toolchains.sh" in row["error"]


def test_with_a_device_qemu_is_not_needed(monkeypatch):
    from squeeze.targets.remote import Runner
    real = toolchains.shutil.which
    monkeypatch.setattr(toolchains.shutil, "which", lambda name: None if name == "qemu-aarch64" else real(name))
    target = Arm()
    assert "qemu-aarch64" in (target.missing() or "")
    target.runner = Runner.from_args(rpc="127.0.0.1:9090")
    assert "qemu-aarch64" not in (target.missing() or "")
