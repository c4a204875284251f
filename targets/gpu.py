"""`gpu`: NVIDIA GPUs through CUDA. The TVM wheel carries a CUDA runtime, so on a machine with an NVIDIA GPU the
model is compiled with TVM's GPU pipeline (dlight default schedules) and timed natively (`method=native`); with
`--rpc`/`--tracker` it runs on the device's GPU (`method=rpc`). On a machine without one it is compiled only:
the library and the CUDA source are written to OUTDIR and the row says that nothing was measured.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx

from squeeze.errors import TargetError
from squeeze.registry import register_target

from . import device_build, remote, tvm_build
from .base import Artifact, Measurement, Target, build_folder, relative

DEFAULT_ARCH = "sm_80"


@register_target("gpu")
class Gpu(Target):
    def timing_method(self) -> str | None:
        if self.runner is not None:
            return "rpc"
        return "native" if self.gpu_present() else None

    """NVIDIA GPU via CUDA (dlight schedules): native timing on a CUDA machine, RPC, or compile-only."""

    def __init__(self, *, arch: Annotated[str, "CUDA arch, e.g. sm_80, sm_90a; 'auto' = this machine's GPU, "
                                               f"else {DEFAULT_ARCH}"] = "auto",
                 tag: Annotated[str, "a TVM CUDA target tag instead, quoted: gpu(tag=\"nvidia/nvidia-t4\")"] = ""):
        self.arch = arch
        self.tag = tag

    @staticmethod
    def gpu_present() -> bool:
        try:
            return bool(tvm_build.tvm().cuda(0).exist)
        except Exception:  # no driver, no libcuda: no GPU
            return False

    def tvm_target(self):
        tvm = tvm_build.tvm()
        if self.tag:
            return device_build.tagged_target("gpu", self.tag, "cuda", "llvm")
        arch = self.arch
        if arch == "auto":
            arch = (f"sm_{tvm.cuda(0).compute_version.replace('.', '')}" if self.gpu_present() and self.runner is None
                    else DEFAULT_ARCH)
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm")

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        executable, source = device_build.compile_model(model, shapes, target, "CUDA", "cuda")
        folder = build_folder(workdir, f"gpu-{(self.tag or target.attrs.get('arch', 'cuda')).replace('/', '-')}", model)
        (folder / "kernels.cu").write_text(source)
        library = remote.export(executable, folder / "model.so") if self.runner is not None or \
            self.gpu_present() else None
        names = [i.name for i in model.graph.input if i.name in shapes]
        info = {"tvm_target": str(target), "kernels_source": relative(folder / "kernels.cu", workdir)}
        if library is not None:
            info["library"] = relative(library, workdir)
        return Artifact(self.name, handle={"executable": executable, "names": names, "library": library,
                                           "folder": folder}, files=[folder / "kernels.cu"],
                        build_seconds=tvm_build.seconds_since(start), info=info)

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        handle = artifact.handle
        if self.runner is not None:
            outputs, latency, info = remote.measure(self.runner, handle["library"], handle["names"], samples, runs,
                                                    device="cuda")
            return Measurement("rpc", latency_ms=latency, outputs=outputs, extra=info)
        if not self.gpu_present():
            raise TargetError(f"gpu: compiled only — no NVIDIA GPU on this machine, nothing measured; the CUDA "
                              f"kernels are in {artifact.info['kernels_source']}. Run on a machine with an NVIDIA "
                              f"GPU, or give --rpc/--tracker for one")
        tvm = tvm_build.tvm()
        runner = tvm_build.VMRunner(handle["executable"], tvm.cuda(0), handle["names"])
        outputs = [runner.run(s) for s in samples]
        latency = runner.time(samples[0], runs)
        stacked = {str(i): np.stack([o[i] for o in outputs]) for i in range(len(outputs[0]))}
        return Measurement("native", latency_ms=latency, outputs=stacked,
                           extra={"gpu": str(tvm.cuda(0).device_name)})
