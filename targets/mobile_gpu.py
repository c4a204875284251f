"""`mobile-gpu`: OpenCL on phone/board GPUs (Arm Mali, Qualcomm Adreno), host CPU aarch64.

TVM builds the model with its GPU pipeline (dlight's default schedule rules, `tvm.s_tir.dlight`), the library is
cross-linked for aarch64 (`export_library`, OpenCL kernels embedded) and the kernels' OpenCL C is written beside
it (`kernels.cl`).

- With `--rpc`/`--tracker` the library runs on the device's OpenCL (`sess.cl(0)`): `method=rpc`.
- Without a device the generated kernels are checked on this machine's CPU OpenCL (PoCL): the TVM wheel has no
  OpenCL runtime, so squeeze launches them itself (`opencl_cpu`), in the order and with the grid/block sizes of
  the library's host code, over buffers laid out by the same memory plan: `method=opencl-cpu`, outputs compared
  with ONNX Runtime, no latency claimed (a CPU emulating a GPU says nothing about a Mali).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import onnx

from squeeze.errors import TargetError
from squeeze.registry import Range, register_target

from . import c_program, device_build, remote, toolchains, tvm_build
from .arm import CROSS_CXX
from .base import Artifact, Measurement, Target
from .base import build_folder, relative

# Arm Mali (Bifrost/Valhall): up to 384+ work-items per group, 32 KiB local memory; TVM has no Mali tag.
MALI = {"kind": "opencl", "device": "mali", "keys": ["mali", "opencl", "gpu"], "max_num_threads": 256,
        "max_threads_per_block": 256, "thread_warp_size": 1, "max_shared_memory_per_block": 32768}
GENERIC = {"kind": "opencl", "keys": ["opencl", "gpu"], "max_num_threads": 256, "max_threads_per_block": 256,
           "thread_warp_size": 1, "max_shared_memory_per_block": 16384}
HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


@register_target("mobile-gpu")
class MobileGpu(Target):
    def timing_method(self) -> str | None:
        return "rpc" if self.runner is not None else "opencl-cpu"

    """OpenCL GPU (Mali, Adreno) with an aarch64 host: timed on a device over RPC, else kernels checked on PoCL."""

    def __init__(self, *, gpu: Annotated[Literal["mali", "adreno", "generic"],
                                         "preset: mali, adreno (TVM tag qcom/adreno-opencl) or generic OpenCL"] = "mali",
                 tag: Annotated[str, "a TVM OpenCL target tag instead of gpu, quoted"] = "",
                 tune: Annotated[int, Range(0, 100_000), "MetaSchedule trials (not available for mobile-gpu: "
                                 "noted in the report, the dlight schedules are used)"] = 0):
        self.gpu = gpu
        self.tag = tag
        self.tune = tune

    def missing(self) -> str | None:
        gone = toolchains.missing("arm", optional=("clinfo", "qemu-aarch64"))
        if gone:
            return f"mobile-gpu: {gone}"
        if self.runner is None and not toolchains.find(toolchains.TOOLS[6]):
            return f"mobile-gpu: no OpenCL loader to check the kernels on; {toolchains.install_hint('mobile-gpu')}"
        return None

    def tvm_target(self):
        tvm = tvm_build.tvm()
        host = tvm.target.Target(HOST)
        if self.tag:
            return device_build.tagged_target("mobile-gpu", self.tag, "opencl", host)
        if self.gpu == "adreno":
            return tvm.target.Target(tvm.target.Target("qcom/adreno-opencl"), host=host)
        return tvm.target.Target(MALI if self.gpu == "mali" else GENERIC, host=host)

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        with c_program.capture_plan() as plan:  # the memory plan the PoCL launcher lays buffers out by
            executable, source = device_build.compile_model(model, shapes, target, "OpenCL", "opencl")
        folder = build_folder(workdir, f"mobile-gpu-{(self.tag or self.gpu).replace('/', '-')}", model)
        library = remote.export(executable, folder / "model.so", CROSS_CXX)
        if not source:
            raise TargetError("mobile-gpu: TVM produced no OpenCL module")
        (folder / "kernels.cl").write_text(source)
        names = [i.name for i in model.graph.input if i.name in shapes]
        handle = {"library": library, "names": names, "source": source, "plan": plan.get("mod"),
                  "target": target}
        info = {"tvm_target": str(target), "library": relative(library, workdir),
                "kernels_source": relative(folder / "kernels.cl", workdir),
                "opencl_kernels": len(set(re.findall(r"__kernel void (\w+)\(", source)))}
        return Artifact(self.name, handle=handle, files=[library, folder / "kernels.cl"],
                        build_seconds=tvm_build.seconds_since(start), info=info)

    def _tune_note(self) -> list[str]:
        if not self.tune:
            return []
        return [f"tune={self.tune} not applied: squeeze tunes cpu and arm only; OpenCL kernels keep TVM's dlight "
                "GPU schedules (tuning them needs MetaSchedule GPU rules timed on the device, not built yet)"]

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        handle = artifact.handle
        if self.runner is not None:
            outputs, latency, info = remote.measure(self.runner, handle["library"], handle["names"], samples, runs,
                                                    device="opencl")
            return Measurement("rpc", latency_ms=latency, outputs=outputs, extra=info, notes=self._tune_note())
        if handle["plan"] is None:
            raise TargetError("mobile-gpu: TVM's pipeline exposed no memory plan; cannot launch the kernels on PoCL")
        program = c_program.program_from_plan(handle["plan"])
        launches = kernel_launches(program, handle["target"])
        outputs, device = run_on_opencl(program, launches, handle["source"], samples, handle["names"])
        notes = [f"OpenCL kernels run on {device} (a CPU OpenCL) by squeeze's launcher: outputs checked, no latency "
                 "claimed; give --rpc/--tracker to time it on the GPU"] + self._tune_note()
        extra = {"opencl_device": device, "kernel_launches": sum(len(v) for v in launches.values())}
        return Measurement("opencl-cpu", latency_ms=None, outputs=outputs, notes=notes, extra=extra)


# ------------------------------------------------------------------------------------------------ PoCL launcher

def kernel_launches(program: c_program.Program, target) -> dict[str, list[tuple[str, list[str], list[int],
                                                                                       list[int]]]]:
    """For each PrimFunc: its device kernels in launch order, as (name, params, global size, local size).

    Runs TVM's own TIR pipeline up to the host/device split on the planned kernels (the same lowering the
    library got), reads each kernel's thread extents (static shapes: literals) and the host code's launch order.
    """
    tvm = tvm_build.tvm()
    from tvm.tirx.build import split_host_device_mods  # noqa: PLC0415
    mod = tvm.tirx.transform.BindTarget(target)(program.tir)
    pipeline = tvm.tirx.get_default_tir_pipeline(target)  # the library's own TIR lowering (adreno has its own)
    pipeline = pipeline[0] if isinstance(pipeline, tuple) else pipeline
    with tvm_build.keep_affinity():
        mod = pipeline(mod)
    host_mod, device_mods = split_host_device_mods(mod)
    kernels = {}
    for device_mod in device_mods.values():
        for gv, func in device_mod.functions.items():
            text = func.script()
            extents = {tag: int(n) for tag, n in re.findall(
                r'T\.launch_thread\("((?:blockIdx|threadIdx)\.[xyz])",\s*(?:T\.int(?:32|64)\()?(\d+)', text)}
            params = []
            for p in func.params:
                if not p.name.endswith("_ptr"):
                    raise TargetError(f"mobile-gpu: kernel {gv.name_hint} takes a scalar {p.name}; not supported")
                params.append(p.name[:-4])
            grid = [extents.get(f"blockIdx.{a}", 1) for a in "xyz"]
            block = [extents.get(f"threadIdx.{a}", 1) for a in "xyz"]
            kernels[gv.name_hint] = (params, [g * b for g, b in zip(grid, block)], block)
    launches = {}
    for gv, func in host_mod.functions.items():
        name = gv.name_hint.removeprefix("__tvm_ffi_")
        text = func.script()
        order = sorted((text.find(f'"{k}"'), k) for k in kernels if f'"{k}"' in text)
        launches[name] = [(k, *kernels[k]) for _, k in order]
    return launches


def run_on_opencl(program: c_program.Program, launches, source: str, samples, names: list[str]):
    """Run the planned program on the first CPU OpenCL device; stacked outputs and the device name."""
    from . import opencl_cpu  # noqa: PLC0415
    tvm_build.tvm()
    try:
        session = opencl_cpu.Session()
    except opencl_cpu.OpenCLError as exc:
        raise TargetError(f"mobile-gpu: {exc}") from None
    try:
        prog = session.program(source)
        kernel_handles = {}
        params_of = _param_names(program)
        by_key = {t.key: t for t in program.views + program.consts}
        regions: dict[int, int] = {}
        for t in program.views:
            if t.region == "arena":
                regions[t.offset] = max(regions.get(t.offset, 0), t.nbytes)
        for s in program.storages:
            regions[s.offset] = max(regions.get(s.offset, 0), s.nbytes)
        arena = {off: session.buffer(size) for off, size in regions.items()}
        consts = {c.key: session.buffer(c.nbytes, c.data) for c in program.consts}

        def mem(t: c_program.Tensor) -> tuple[str, int]:
            if t.region == "const":
                return ("mem", consts[t.key.split("_r")[0]])
            return ("mem", arena[t.offset])

        outputs = []
        for feed in samples:
            for t, name in zip(program.inputs, names):
                session.write(arena[t.offset], np.ascontiguousarray(feed[name], dtype=t.dtype))
            for kernel, args in program.calls:
                binding = dict(zip(params_of[kernel], (by_key[a] for a in args)))
                for kname, params, global_size, local_size in launches.get(kernel, []):
                    if kname not in kernel_handles:
                        kernel_handles[kname] = session.kernel(prog, kname)
                    missing = [p for p in params if p not in binding]
                    if missing:
                        raise TargetError(f"mobile-gpu: kernel {kname} uses buffers the plan does not name: "
                                          f"{', '.join(missing)}")
                    session.launch(kernel_handles[kname], [mem(binding[p]) for p in params], global_size,
                                   local_size)
            session.finish()
            row = []
            for t in program.outputs:
                raw = session.read(mem(t)[1], t.nbytes)
                row.append(np.frombuffer(raw, dtype=t.dtype).reshape(t.shape).copy())
            outputs.append(row)
        device = session.device_name
    except opencl_cpu.OpenCLError as exc:
        raise TargetError(f"mobile-gpu: {exc}") from None
    finally:
        session.close()
    stacked = {str(i): np.stack([o[i] for o in outputs]) for i in range(len(program.outputs))}
    return stacked, device


def _param_names(program: c_program.Program) -> dict[str, list[str]]:
    """PrimFunc name → its buffer parameter names, in call order."""
    return {gv.name_hint: [p.name for p in func.params] for gv, func in program.tir.functions.items()}


