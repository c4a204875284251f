"""`mobile-gpu` (OpenCL with dlight schedules, aarch64 host) and `gpu` (CUDA). Without a device, mobile-gpu's
generated kernels run on PoCL (a CPU OpenCL) through squeeze's own launcher and must match ONNX Runtime; gpu is
compile-only on a machine without an NVIDIA GPU (this one), and says so."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from squeeze.errors import TargetError
from squeeze.targets.gpu import Gpu
from squeeze.targets.mobile_gpu import MobileGpu

pytestmark = pytest.mark.tvm


def _digits(repo):
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    rng = np.random.default_rng(5)
    samples = [{"input": rng.random((1, 1, 8, 8), dtype=np.float32)} for _ in range(2)]
    sess = ort.InferenceSession(model.SerializeToString())
    return model, samples, np.stack([sess.run(None, s)[0] for s in samples])


@pytest.fixture(scope="module")
def opencl_cpu():
    why = MobileGpu().missing()
    if why:
        pytest.skip(why)
    from squeeze.targets import opencl_cpu as ocl
    if not ocl.list_devices():
        pytest.skip("no OpenCL device: apt-get install pocl-opencl-icd (scripts/install-toolchains.sh mobile-gpu)")


@pytest.mark.parametrize("gpu", ["mali", "adreno"])
def test_opencl_kernels_match_onnx_runtime_on_pocl(opencl_cpu, repo, tmp_path, gpu):
    model, samples, expected = _digits(repo)
    target = MobileGpu(gpu=gpu)
    artifact = target.build(model, {"input": (1, 1, 8, 8)}, tmp_path)
    measured = target.measure(artifact, samples, runs=3)
    assert measured.method == "opencl-cpu" and measured.latency_ms is None
    assert float(np.abs(measured.outputs["0"] - expected).max()) < 1e-4
    assert measured.extra["kernel_launches"] >= 5
    kernels = (tmp_path / artifact.info["kernels_source"]).read_text()
    assert "__kernel void" in kernels and artifact.info["opencl_kernels"] >= 5
    lib = artifact.handle["library"].read_bytes()[:20]
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 183  # aarch64 host code


def test_mobile_gpu_uses_gpu_schedules(repo):
    """dlight binds GPU threads: the kernels launch thread blocks, not one serial work-item."""
    from squeeze.targets import c_program, tvm_build
    from squeeze.targets.mobile_gpu import kernel_launches
    model, _, _ = _digits(repo)
    target = MobileGpu().tvm_target()
    mod = tvm_build.import_onnx(model, {"input": (1, 1, 8, 8)})
    import tvm
    from tvm import relax
    with c_program.capture_plan() as plan:
        tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    launches = kernel_launches(c_program.program_from_plan(plan["mod"]), target)
    sizes = [local for per in launches.values() for _, _, _, local in per]
    assert sizes and max(int(np.prod(s)) for s in sizes) > 1


def test_gpu_is_compile_only_without_an_nvidia_gpu(repo, tmp_path):
    if Gpu.gpu_present():
        pytest.skip("this machine has an NVIDIA GPU: the gpu target measures natively here")
    model, samples, _ = _digits(repo)
    target = Gpu()
    artifact = target.build(model, {"input": (1, 1, 8, 8)}, tmp_path)
    assert "__global__" in (tmp_path / artifact.info["kernels_source"]).read_text()
    assert '"arch":"sm_80"' in artifact.info["tvm_target"].replace(" ", "")
    with pytest.raises(TargetError, match="compiled only"):
        target.measure(artifact, samples, runs=3)
