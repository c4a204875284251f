"""`cpu`: the host CPU, compiled by TVM with LLVM for the exact host micro-architecture and timed natively."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx

from squeeze.registry import register_target

from . import tvm_build
from .base import Artifact, Measurement, Target


@register_target("cpu")
class Cpu(Target):
    """Host CPU via LLVM (mcpu = the host CPU as LLVM names it); native timing."""

    host_native = True

    def __init__(self, *, mcpu: Annotated[str, "LLVM CPU name; 'host' asks LLVM for this machine's"] = "host"):
        self.mcpu = mcpu

    def tvm_target(self):
        tvm = tvm_build.tvm()
        cpu = tvm_build.host_cpu() if self.mcpu == "host" else self.mcpu
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu})

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        mod = tvm_build.import_onnx(model, shapes)
        executable = tvm_build.compile_module(mod, target)
        names = [i.name for i in model.graph.input if i.name in shapes]
        return Artifact(self.name, handle=(executable, names), build_seconds=tvm_build.seconds_since(start),
                        info={"tvm_target": str(target)})

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        tvm = tvm_build.tvm()
        executable, names = artifact.handle
        runner = tvm_build.VMRunner(executable, tvm.cpu(), names)
        outputs = [runner.run(s) for s in samples]
        latency = runner.time(samples[0], runs)
        stacked = {str(i): np.stack([o[i] for o in outputs]) for i in range(len(outputs[0]))}
        return Measurement("native", latency_ms=latency, outputs=stacked)
