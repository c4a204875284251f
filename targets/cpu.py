"""`cpu`: the host CPU, compiled by TVM with LLVM for the exact host micro-architecture and timed natively.

Functions get squeeze's default schedules (`targets/schedules`: packed, vectorized, parallel kernels) unless
`schedules=false` asks for TVM's own pipeline; `tune=N` (CLI `--tune N`) first spends N MetaSchedule trials,
cached in a database (`targets/tuning.py`) that later builds reuse.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx

from squeeze.registry import Range, register_target

from . import tvm_build
from .base import Artifact, Measurement, Target


@register_target("cpu")
class Cpu(Target):
    """Host CPU via LLVM (mcpu = the host CPU as LLVM names it); native timing."""

    host_native = True

    def __init__(self, *, mcpu: Annotated[str, "LLVM CPU name; 'host' asks LLVM for this machine's"] = "host",
                 schedules: Annotated[bool, "squeeze's default schedules; false: TVM's default pipeline"] = True,
                 tune: Annotated[int, Range(0, 100_000), "MetaSchedule trials before building (0: none)"] = 0,
                 tune_cache: Annotated[str, "tuning database folder (default $SQUEEZE_CACHE/tuning, "
                                            "else ~/.cache/squeeze/tuning)"] = ""):
        self.mcpu = mcpu
        self.schedules = schedules
        self.tune = tune
        self.tune_cache = tune_cache

    def tvm_target(self):
        tvm = tvm_build.tvm()
        cpu = tvm_build.host_cpu() if self.mcpu == "host" else self.mcpu
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu})

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        mod = tvm_build.import_onnx(model, shapes)
        info = {"tvm_target": str(target), "schedules": "squeeze" if self.schedules else "tvm-default"}
        pipeline = None
        if self.schedules:
            from . import schedules  # noqa: PLC0415
            database = None
            if self.tune and self.runner is None:  # tuning measures here; a remote device would need its own
                from . import tuning  # noqa: PLC0415
                cache = tuning.cache_dir(self.tune_cache or None)
                functions: dict = {}
                database = tuning.tune(mod, target, trials=self.tune, cache=cache, threads=tvm_build.threads(),
                                       stats=functions)
                info["tuning"] = {"trials": self.tune, "database": str(tuning.database_dir(
                    cache, target, tvm_build.threads())), "seconds": tvm_build.seconds_since(start),
                    "functions": functions}
            pipeline = schedules.build_pipeline(target, database)
        executable = tvm_build.compile_module(mod, target, pipeline)
        names = [i.name for i in model.graph.input if i.name in shapes]
        return Artifact(self.name, handle=(executable, names), build_seconds=tvm_build.seconds_since(start),
                        info=info)

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        tvm = tvm_build.tvm()
        executable, names = artifact.handle
        if self.runner is not None:  # --rpc / --tracker: export, upload and time on the device (remote.py)
            from .remote import measure_executable  # noqa: PLC0415
            outputs, latency, info = measure_executable(self.runner, executable, names, samples, runs)
            return Measurement("rpc", latency_ms=latency, outputs=outputs, extra=info)
        runner = tvm_build.VMRunner(executable, tvm.cpu(), names)
        outputs = [runner.run(s) for s in samples]
        latency = runner.time(samples[0], runs)
        stacked = {str(i): np.stack([o[i] for o in outputs]) for i in range(len(outputs[0]))}
        return Measurement("native", latency_ms=latency, outputs=stacked)
