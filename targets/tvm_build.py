"""Shared TVM lowering: ONNX → Relax (frontend) → `tvm.compile` → VirtualMachine, and running it.

TVM is imported here, lazily by the targets; the core and the passes never import it.
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx

from squeeze.canonical import explicit_pads, freeze_shapes, integer_weights
from squeeze.errors import TargetError
from squeeze.registry import provides


def tvm():
    """Import TVM with the thread count squeeze was asked for (TVM reads TVM_NUM_THREADS once, at start)."""
    with keep_affinity():
        import tvm as _tvm  # noqa: PLC0415
        from tvm import relax  # noqa: F401,PLC0415
    return _tvm


@contextmanager
def keep_affinity():
    """TVM's thread pool pins the calling thread to one core; restore the process's CPU set afterwards."""
    try:
        before = os.sched_getaffinity(0)
    except AttributeError:
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@provides("compile-threads")
def set_threads(threads: int | None) -> None:
    """Thread count for TVM's runtime (must be called before TVM starts its thread pool)."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)


def threads() -> int:
    """The thread count TVM's runtime uses in this process (TVM_NUM_THREADS, else the cores we may run on)."""
    value = os.environ.get("TVM_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def host_cpu() -> str:
    """The host CPU as LLVM names it (`mcpu=native` silently means `generic` in TVM 0.27)."""
    return tvm().get_global_func("target.llvm_get_system_cpu")()


def host_triple() -> str:
    """The host's LLVM target triple ("x86_64-…-linux-gnu", "aarch64-…")."""
    return tvm().get_global_func("target.llvm_get_system_triple")()


def import_onnx(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]):
    """Relax module for `model` with static input shapes; TargetError naming the ops TVM lacks.

    The model is first frozen to `shapes` (squeeze.canonical.freeze_shapes, on a copy): TVM's frontend needs the
    shape arithmetic of dynamic-shape exports (Shape→Gather→Concat→Reshape) folded to constants; a Conv's
    auto_pad=SAME_* becomes explicit pads (squeeze.canonical.explicit_pads); int8 ConvTranspose weights are read
    through a DequantizeLinear (squeeze.canonical.integer_weights), so that int8 targets see them.
    """
    _tvm = tvm()
    model = explicit_pads(freeze_shapes(integer_weights(model), shapes))
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
              for i in model.graph.input if i.name in shapes}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return from_onnx(model, shape_dict={k: list(v) for k, v in shapes.items()}, dtype_dict=dtypes,
                             keep_params_in_input=False)
    except _tvm.error.OpNotImplemented as exc:
        raise TargetError(f"TVM's ONNX frontend cannot import the model: {error_line(exc)}") from exc
    except Exception as exc:  # the frontend raises many types for unsupported attribute/opset combinations
        ops = _op_hint(model, exc)
        raise TargetError(f"TVM's ONNX frontend failed{ops}: {type(exc).__name__}: {error_line(exc)}") from exc


def _op_hint(model: onnx.ModelProto, exc: BaseException) -> str:
    """Best effort: name the op whose conversion raised, from the traceback's converter class."""
    tb = exc.__traceback__
    while tb is not None:
        frame_self = tb.tb_frame.f_locals.get("cls") or tb.tb_frame.f_locals.get("self")
        name = getattr(frame_self, "__name__", None)
        if name and any(n.op_type == name for n in model.graph.node):
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
            return f" on op {name} (opset {opset})"
        tb = tb.tb_next
    return ""


@contextmanager
def pass_context(config: dict | None = None, instruments=()):
    """The current PassContext with `config` entries and `instruments` added (opt level, passes kept)."""
    _tvm = tvm()
    current = _tvm.transform.PassContext.current()
    with _tvm.transform.PassContext(opt_level=current.opt_level, config={**dict(current.config), **(config or {})},
                                    required_pass=list(current.required_pass),
                                    disabled_pass=list(current.disabled_pass),
                                    instruments=[*current.instruments, *instruments]) as ctx:
        yield ctx


def compile_module(mod, target, pipeline=None) -> Any:
    """`tvm.compile` with `pipeline` (a Relax pass; default: Relax's default pipeline for `target`).

    CPU targets pass `schedules.build_pipeline(target)` for squeeze's default schedules, which lower with
    `schedules.COMPILE_CONFIG` (what their schedules rely on TVM's lowering to do).
    """
    _tvm = tvm()
    from tvm import relax  # noqa: PLC0415
    config, tir = {}, "default"
    if pipeline is not None:
        from .schedules import COMPILE_CONFIG  # noqa: PLC0415
        from .schedules.pipeline import register_tir_pipeline  # noqa: PLC0415
        config, tir = COMPILE_CONFIG, register_tir_pipeline()
    try:
        with keep_affinity(), pass_context(config):
            return _tvm.compile(mod, target=target, relax_pipeline=pipeline or relax.get_default_pipeline(target),
                                tir_pipeline=tir)
    except Exception as exc:
        raise TargetError(f"TVM failed to compile the model: {type(exc).__name__}: {error_line(exc)}") from exc


class VMRunner:
    """A loaded Relax VM: run one feed, or time repeated calls with fixed inputs."""

    def __init__(self, executable, device, input_names: list[str]):
        _tvm = tvm()
        from tvm import relax  # noqa: PLC0415
        self._tvm = _tvm
        self.device = device
        with keep_affinity():
            self.vm = relax.VirtualMachine(executable, device)
        self.input_names = input_names

    def tensors(self, feed: dict[str, np.ndarray]) -> list:
        return [self._tvm.runtime.tensor(np.ascontiguousarray(feed[n]), self.device) for n in self.input_names]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with keep_affinity():
            out = self.vm["main"](*self.tensors(feed))
        return flatten_outputs(out)

    def time(self, feed: dict[str, np.ndarray], runs: int) -> dict:
        from squeeze.timing import time_calls  # noqa: PLC0415
        args = self.tensors(feed)
        fn = self.vm["main"]
        with keep_affinity():
            return time_calls(lambda: (fn(*args), self.device.sync()), runs=runs)


def flatten_outputs(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result = []
    for item in out:
        result.extend(flatten_outputs(item))
    return result


def error_line(exc: BaseException) -> str:
    """The line of a TVM error that says what went wrong (TVM puts it last, after its backtrace)."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors often end with the useful line; prefer one naming an error type.
    for ln in reversed(lines):
        if "Error" in ln or "not supported" in ln:
            return ln.strip()[:300]
    return (lines[-1] if lines else type(exc).__name__).strip()[:300]


def seconds_since(start: float) -> float:
    return round(time.perf_counter() - start, 3)
