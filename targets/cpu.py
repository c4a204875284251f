"""`cpu`: the host CPU, compiled by TVM with LLVM for the exact host micro-architecture and timed natively.

Functions get squeeze's default schedules (`targets/schedules`: packed, vectorized, parallel kernels) unless
`schedules=false` asks for TVM's own pipeline; `tune=N` (CLI `--tune N`) first spends N MetaSchedule trials,
cached in a database (`targets/tuning.py`) that later builds reuse. With `--rpc`/`--tracker` the candidates are
timed on the device (MetaSchedule's RPCRunner), into a database of that device's own, and the report gives the
model's latency on the device both untuned (default schedules) and tuned.
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

    @property
    def channel_multiple(self) -> int:
        from .schedules import simd  # noqa: PLC0415
        return min(8, simd.describe(self.tvm_target()).lanes("float32"))

    def tvm_target(self):
        tvm = tvm_build.tvm()
        cpu = tvm_build.host_cpu() if self.mcpu == "host" else self.mcpu
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu})

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        mod = tvm_build.import_onnx(model, shapes)
        info = {"tvm_target": str(target), "schedules": "squeeze" if self.schedules else "tvm-default"}
        pipeline = untuned = None
        if self.schedules:
            from . import schedules  # noqa: PLC0415
            database = None
            if self.tune:  # candidates timed where the model runs: here, or on the --rpc/--tracker device
                from . import tuning  # noqa: PLC0415
                database, info["tuning"] = tuning.tune_model(mod, target, trials=self.tune,
                                                             tune_cache=self.tune_cache, device=self.runner)
            # natively the thread count is known (--threads): 1 thread gets no parallel loops
            threads = tvm_build.threads() if self.runner is None else None
            pipeline = schedules.build_pipeline(target, database, threads)
            if database is not None and self.runner is not None:  # the untuned build, timed beside the tuned one
                untuned = tvm_build.compile_module(mod, target, schedules.build_pipeline(target))
        executable = tvm_build.compile_module(mod, target, pipeline)
        names = [i.name for i in model.graph.input if i.name in shapes]
        # handle: (executable, input names), plus the untuned executable when tuned on a device
        handle = (executable, names) if untuned is None else (executable, names, untuned)
        return Artifact(self.name, handle=handle, build_seconds=tvm_build.seconds_since(start), info=info)

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        tvm = tvm_build.tvm()
        executable, names, *untuned = artifact.handle
        if self.runner is not None:  # --rpc / --tracker: export, upload and time on the device (remote.py)
            from .remote import measure_executable  # noqa: PLC0415
            outputs, latency, info = measure_executable(self.runner, executable, names, samples, runs)
            notes = []
            if untuned:  # tuned on the device: the default schedules' latency there, for comparison
                _, before, _ = measure_executable(self.runner, untuned[0], names, samples[:1], runs)
                notes.append(tuned_note(before, latency, self.runner.describe()))
                info.update(untuned_latency_ms=before, tuning_speedup=round(before["p50"] / latency["p50"], 4))
            return Measurement("rpc", latency_ms=latency, outputs=outputs, extra=info, notes=notes)
        runner = tvm_build.VMRunner(executable, tvm.cpu(), names)
        outputs = [runner.run(s) for s in samples]
        latency = runner.time(samples[0], runs)
        stacked = {str(i): np.stack([o[i] for o in outputs]) for i in range(len(outputs[0]))}
        return Measurement("native", latency_ms=latency, outputs=stacked)


def tuned_note(untuned: dict, tuned: dict, where: str, baseline: str = "squeeze's default schedules") -> str:
    """One line for the report: the model's latency on the device before and after tuning."""
    return (f"tuned on the device ({where}): p50 {tuned['p50']:.4f} ms tuned vs {untuned['p50']:.4f} ms untuned "
            f"({baseline}), {untuned['p50'] / tuned['p50']:.2f}×")
