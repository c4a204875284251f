"""The build path the GPU targets share (`gpu` = CUDA, `mobile-gpu` = OpenCL): a TVM target from a tag or a preset,
compiled with TVM's default GPU pipeline (dlight schedules), and the device kernels' source for the output folder.
"""
from __future__ import annotations

from squeeze.errors import TargetError

from . import tvm_build


def tagged_target(target: str, tag: str, kind: str, host):
    """`tag` as a TVM target of `kind` (`cuda`, `opencl`) with `host`; a one-line error for an unknown tag or one
    of another kind."""
    tvm = tvm_build.tvm()
    try:
        device = tvm.target.Target(tag)
    except Exception as exc:
        raise TargetError(f"{target}: unknown TVM target tag {tag!r} ({tvm_build.error_line(exc)})") from None
    if device.kind.name != kind:
        raise TargetError(f"{target}: tag {tag!r} is not a {kind} target ({device.kind.name})")
    return tvm.target.Target(device, host=host)


def compile_default(mod, target, what: str):
    """`mod` compiled with TVM's default pipeline for `target` (dlight GPU schedules)."""
    tvm = tvm_build.tvm()
    from tvm import relax  # noqa: PLC0415
    try:
        with tvm_build.keep_affinity():
            return tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    except Exception as exc:
        raise TargetError(f"TVM failed to compile for {what}: {type(exc).__name__}: "
                          f"{tvm_build.error_line(exc)}") from exc


def compile_model(model, shapes: dict[str, tuple[int, ...]], target, what: str, kind: str):
    """The build both GPU targets run: `model` imported for `shapes`, compiled for `target` (`compile_default`),
    and the source of its `kind` kernels; (executable, source)."""
    executable = compile_default(tvm_build.import_onnx(model, shapes), target, what)
    return executable, device_source(executable, kind)


def device_source(executable, kind: str) -> str:
    """The source of every `kind` module (`cuda`, `opencl`) the compiled library imports, in import order."""
    found, stack = [], [executable.mod]
    while stack:
        module = stack.pop()
        if module.kind == kind:
            found.append(module.inspect_source())
        stack.extend(module.imports)
    return "\n".join(found)
