"""`arm`: aarch64 Linux (Raspberry Pi 4 / Cortex-A72, Cortex-A53/A55/A76 phones and boards) with NEON.

TVM compiles with LLVM for `aarch64-linux-gnu`; the library is cross-linked with `aarch64-linux-gnu-g++`
(`export_library`) and written to OUTDIR/arm-…/model.so, ready for `relax.VirtualMachine` on the device.

- With `--rpc HOST:PORT` or `--tracker HOST:PORT --key KEY` it is uploaded to the device and timed there
  (`method=rpc`, median and p90 after warm-up).
- Without a device it is checked under `qemu-aarch64` user emulation (`method=emulated`): the library's own
  kernel object (the exact NEON code in model.so) is linked with squeeze's standalone entry point (the same
  emitter as `mcu`) into a static aarch64 executable, whose outputs are compared with ONNX Runtime. Its time is
  the emulator's and says nothing about a real core.
- `tune=N` (CLI `--tune N`) tunes with MetaSchedule on the device: candidates are compiled here, cross-linked
  with `aarch64-linux-gnu-g++`, and timed on the device through `--tracker`/`--rpc` (`tuning.tune_model`); the
  tuned library uses squeeze's CPU schedules plus the database, and the report gives the device latency of
  the untuned library (TVM's default pipeline, the build without `--tune`) beside it. Without a device there
  is nothing to time candidates on (qemu's time means nothing): the build notes that and uses the defaults.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx

from squeeze.errors import TargetError
from squeeze.registry import Range, register_target

from . import c_program, remote, toolchains, tvm_build
from .base import Artifact, Measurement, Target
from .cpu import tuned_note
from .base import build_folder, relative

CROSS_CC = "aarch64-linux-gnu-gcc"
CROSS_CXX = "aarch64-linux-gnu-g++"
EMULATED_RUNS = 20


@register_target("arm")
class Arm(Target):
    def timing_method(self) -> str | None:
        return "rpc" if self.runner is not None else "emulated"

    """aarch64 Linux with NEON: cross-compiled library; timed on a device over RPC, else checked in qemu-aarch64."""

    def __init__(self, *, cpu: Annotated[str, "LLVM CPU (generic, cortex-a53, cortex-a55, cortex-a72, cortex-a76, "
                                              "neoverse-n1, ...)"] = "generic",
                 tag: Annotated[str, "a TVM target tag instead of cpu, quoted: arm(tag=\"raspberry-pi/4b-aarch64\")"] = "",
                 tune: Annotated[int, Range(0, 100_000), "MetaSchedule trials timed on the device (needs --rpc or "
                                                         "--tracker; 0: none)"] = 0,
                 tune_cache: Annotated[str, "tuning database folder (default $SQUEEZE_CACHE/tuning, "
                                            "else ~/.cache/squeeze/tuning)"] = ""):
        self.cpu = cpu
        self.tag = tag
        self.tune = tune
        self.tune_cache = tune_cache

    def missing(self) -> str | None:
        gone = toolchains.missing("arm", optional=("clinfo",) + (("qemu-aarch64",) if self.runner else ()))
        return f"arm: {gone}" if gone else None

    @property
    def channel_multiple(self) -> int:
        from .schedules import simd  # noqa: PLC0415
        return min(8, simd.describe(self.tvm_target()).lanes("float32"))

    def tvm_target(self):
        tvm = tvm_build.tvm()
        if self.tag:
            try:
                target = tvm.target.Target(self.tag)
            except Exception as exc:
                raise TargetError(f"arm: unknown TVM target tag {self.tag!r} ({tvm_build.error_line(exc)}); "
                                  "e.g. raspberry-pi/4b-aarch64, arm/rk3399") from None
            triple = str(target.attrs.get("mtriple", ""))
            if target.kind.name != "llvm" or not ("aarch64" in triple or "arm64" in triple):
                raise TargetError(f"arm: tag {self.tag!r} is not an aarch64 CPU target (kind "
                                  f"{target.kind.name}, mtriple {triple or 'none'})")
            return target
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        if self.cpu and self.cpu != "generic":
            spec["mcpu"] = self.cpu
        try:
            return tvm.target.Target(spec)
        except Exception as exc:
            raise TargetError(f"arm: bad cpu {self.cpu!r}: {tvm_build.error_line(exc)}") from None

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        mod = tvm_build.import_onnx(model, shapes)
        info: dict = {"tvm_target": str(target)}
        from .schedules import build_pipeline, int8  # noqa: PLC0415
        info.update(int8.compute_summary(mod, target))  # QDQ layers on sdot where the CPU has dotprod
        int8_pipeline = build_pipeline(target) if info["int8_layers"] else None
        with c_program.capture_plan() as plan:  # the library's own memory plan, for the emulation program
            executable = tvm_build.compile_module(mod, target, int8_pipeline)
        folder = build_folder(workdir, f"arm-{(self.tag or self.cpu).replace('/', '-')}", model)
        names = [i.name for i in model.graph.input if i.name in shapes]
        handle = {"names": names, "folder": folder}
        files = []
        if self.tune and self.runner is not None:  # candidates cross-linked here, timed on the device
            from . import schedules, tuning  # noqa: PLC0415
            database, info["tuning"] = tuning.tune_model(mod, target, trials=self.tune, tune_cache=self.tune_cache,
                                                         device=self.runner, cross_compiler=CROSS_CXX)
            handle["untuned_library"] = remote.export(executable, folder / "model-untuned.so", CROSS_CXX)
            files.append(handle["untuned_library"])
            executable = tvm_build.compile_module(mod, target, schedules.build_pipeline(target, database))
        elif self.tune:
            handle["tune_note"] = (f"tune={self.tune} skipped: tuning times candidates on the device and qemu's "
                                   "time means nothing; give --rpc/--tracker to tune (built untuned)")
        library = handle["library"] = remote.export(executable, folder / "model.so", CROSS_CXX)
        files.insert(0, library)
        if self.runner is None:
            handle.update(self._emulation_objects(mod, target, executable, folder, plan.get("mod")))
            files.append(folder / "model.c")
        info.update({"library": relative(library, workdir), "library_bytes": library.stat().st_size})
        return Artifact(self.name, handle=handle, files=files, build_seconds=tvm_build.seconds_since(start),
                        info=info)

    def _emulation_objects(self, mod, target, executable, folder: Path, planned) -> dict:
        """Objects for the static emulation executable: model.so's kernel object + the standalone entry point."""
        program = (c_program.program_from_plan(planned) if planned is not None
                   else c_program.lower(mod, target))
        kernels = folder / "kernels.o"
        library_kernels = [m for m in executable.mod.imports if m.kind == "llvm"]
        source = "model.so"
        if library_kernels:
            library_kernels[0].write_to_file(str(kernels))
        symbols = _symbols(kernels) if kernels.exists() else {}
        if any(f"__tvm_ffi_{k}" not in symbols for k, _ in program.calls):
            # The library was built by a pipeline whose kernels do not match the plan: compile them directly.
            c_program.kernels_object(program, target, kernels)
            symbols = _symbols(kernels)
            source = "squeeze's own lowering (the library's kernel names differ)"
        pointers = sorted(s for s, kind in symbols.items() if s.startswith("__TVM") and kind in "VvDdBbC")
        texts = {"squeeze_model.h": c_program.MODEL_H, "model.c": c_program.emit_model(program),
                 "runtime.c": c_program.RUNTIME_C, "hooks.c": c_program.hooks_c(pointers)}
        objects = [kernels]
        for name, text in texts.items():
            (folder / name).write_text(text)
            if name.endswith(".c"):
                obj = folder / (name[:-2] + ".o")
                toolchains.run_tool([CROSS_CC, *_cflags(), "-c", name, "-o", obj.name],
                                    what=f"{CROSS_CC} {name}", cwd=folder)
                objects.append(obj)
        return {"program": program, "objects": objects, "kernels_from": source}

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        handle = artifact.handle
        if self.runner is not None:
            outputs, latency, info = remote.measure(self.runner, handle["library"], handle["names"], samples, runs)
            notes = []
            if "untuned_library" in handle:  # tuned on the device: the build without --tune, timed there too
                _, before, _ = remote.measure(self.runner, handle["untuned_library"], handle["names"], samples[:1],
                                              runs)
                notes.append(tuned_note(before, latency, self.runner.describe(),
                                        "TVM's default pipeline, the build without --tune"))
                info.update(untuned_latency_ms=before, tuning_speedup=round(before["p50"] / latency["p50"], 4))
            return Measurement("rpc", latency_ms=latency, outputs=outputs, extra=info, notes=notes)
        measured = self._emulate(handle, samples, min(runs, EMULATED_RUNS))
        if "tune_note" in handle:
            measured.notes.insert(0, handle["tune_note"])
        return measured

    def _emulate(self, handle: dict, samples, runs: int) -> Measurement:
        program: c_program.Program = handle["program"]
        folder: Path = handle["folder"]
        (folder / "test_main.c").write_text(c_program.emit_harness(program, samples, handle["names"], runs,
                                                                      calibrate=False))
        exe = folder / "model_test"
        toolchains.run_tool([CROSS_CC, *_cflags(), "-static", "test_main.c", *[o.name for o in handle["objects"]],
                             "-lm", "-o", exe.name], what="linking the aarch64 test executable", cwd=folder)
        text = toolchains.run_tool(["qemu-aarch64", f"./{exe.name}"], what="qemu-aarch64", cwd=folder,
                                   timeout=600, check=False)
        result = c_program.parse_run(text, program, len(samples))
        stacked = {str(i): np.stack([row[i] for row in result.outputs]) for i in range(len(program.outputs))}
        ms = np.array(result.per_run, dtype=float) / 1e6
        latency = {"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "min": float(ms.min()),
                   "runs": int(len(ms))} if len(ms) else None
        notes = ["checked under qemu-aarch64 user emulation: outputs are the device's (same kernels as model.so), "
                 "the time is the emulator's on this machine and is NOT representative of a Cortex-A core; "
                 "give --rpc/--tracker to time it on a device",
                 f"kernels from {handle['kernels_from']}"]
        return Measurement("emulated", latency_ms=latency, outputs=stacked, notes=notes,
                           extra={"emulator": "qemu-aarch64 (user mode)", "representative_timing": False})


def _cflags() -> list[str]:
    return ["-O2", "-DSQUEEZE_HOSTED", "-fno-common", "-Wno-unused-variable", "-Wno-unused-but-set-variable"] + [
        f"-I{d}" for d in c_program.include_dirs()]


def _symbols(obj: Path) -> dict[str, str]:
    """Defined and undefined symbols of an object file: name → nm type letter."""
    out = toolchains.run_tool(["aarch64-linux-gnu-nm", str(obj)], what="aarch64-linux-gnu-nm")
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            table[parts[-1]] = parts[-2]
    return table
