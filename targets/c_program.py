"""A standalone C program from a Relax module: TVM's kernels plus an entry point squeeze writes itself.

TVM 0.27 has no AOT executor and no microTVM, so for targets without a TVM runtime (bare-metal `mcu`, and the
`arm` emulation check) squeeze lowers the model with Relax's own passes up to static memory planning
(`StaticPlanBlockMemory`), walks the planned `main` — `alloc_storage` / `alloc_tensor` / kernel calls /
reshapes — and emits:

- `model.c`: one static arena (every planned storage, the inputs and the outputs at fixed offsets), the weights as
  `const` arrays (flash), a `const DLTensor` per tensor view, and `squeeze_model_run()` that calls the kernels in
  order through their packed-function ABI (`TVMFFIAny` arguments holding `DLTensor*`);
- `runtime.c`: the few runtime hooks TVM's kernels call (workspace allocator over a static pool with a measured
  peak, serial `TVMBackendParallelLaunch`, error stub);
- `main.c`: a test harness that embeds sample inputs, runs them, prints every output as hex words (exact), counts
  time/instructions over repeated runs and reports workspace and stack use;
- for Cortex-M: `startup.c` (vector table, reset handler, FPU enable, stack painting, semihosting) and a linker
  script for the QEMU MPS2 boards.

The kernels are TVM's: C source from target `c` (bare metal) or an object file from LLVM (e.g. aarch64 NEON,
the same code that goes into the exported shared library).
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from squeeze.errors import TargetError

from . import tvm_build, weight_storage

ALIGN = 64  # TVM kernels may assume 64-byte aligned buffers (kAllocAlignment)


def round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass
class Tensor:
    """One tensor view the kernels see: where its bytes live, its shape and dtype."""

    key: str                      # C identifier of its DLTensor
    shape: tuple[int, ...]
    dtype: str
    region: str                   # "arena" (offset into the arena), "const" (its own const array) or "scratch"
    offset: int = 0               # (a compact weight decoded into the scratch buffer before the call that reads it)
    data: np.ndarray | None = None  # constants only
    label: str = ""
    source: str = ""              # scratch: the key of the compact weight it views

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _itemsize(self.dtype)


@dataclass
class Storage:
    offset: int
    nbytes: int
    tensors: list[str] = field(default_factory=list)  # labels of the tensors planned into it


@dataclass
class Program:
    """The planned model: arena layout, constants, kernel calls in order, inputs and outputs."""

    inputs: list[Tensor]
    outputs: list[Tensor]
    consts: list[Tensor]
    views: list[Tensor]            # every arena tensor view passed to a kernel (inputs/outputs included)
    calls: list[tuple[str, list[str]]]
    storages: list[Storage]
    arena_bytes: int
    tir: Any                       # IRModule of the PrimFuncs (kernels)
    compact: dict[str, Any] = field(default_factory=dict)   # key → weight_storage.CompactWeight (kept compact)
    decodes: dict[int, list[tuple[str, int]]] = field(default_factory=dict)  # call → [(compact key, scratch offset)]
    scratch_bytes: int = 0         # the decode scratch: the most decoded weight bytes one call reads

    @property
    def const_bytes(self) -> int:
        """Float constants (flash)."""
        return sum(c.nbytes for c in self.consts)

    @property
    def compact_bytes(self) -> int:
        """Stored bytes of the compact weights (int8 / bit-packed symbols)."""
        return sum(w.stored_bytes for w in self.compact.values())

    @property
    def table_bytes(self) -> int:
        """Their scales, zero points and codebooks."""
        return sum(w.table_bytes for w in self.compact.values())

    @property
    def flash_data_bytes(self) -> int:
        """Everything the weights put in flash."""
        return self.const_bytes + self.compact_bytes + self.table_bytes

    @property
    def io_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs) + sum(t.nbytes for t in self.outputs)

    def dominant_consts(self, n: int = 5) -> list[Tensor]:
        return sorted(self.consts, key=lambda c: -c.nbytes)[:n]

    def dominant_storages(self, n: int = 5) -> list[Storage]:
        return sorted(self.storages, key=lambda s: -s.nbytes)[:n]


# ------------------------------------------------------------------------------------------------ lowering

def relax_passes(target) -> list:
    """Relax's CPU pipeline (cpu_generic) up to static memory planning: what `tvm.compile` runs before the VM."""
    tvm_build.tvm()
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415
    return (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + cpu.dataflow_lower_passes(target)
            + [relax.transform.StaticPlanBlockMemory(), relax.transform.AttachGlobalSymbol()])


def lower(mod, target, names: dict[str, str] | None = None) -> Program:
    """Plan `mod` (an imported Relax module with static shapes) for `target` and walk its `main`."""
    return walk(plan_module(mod, target), names or {})


def plan_module(mod, target):
    """`mod` through Relax's passes up to static memory planning for `target` (the planned module `walk` reads)."""
    tvm = tvm_build.tvm()
    try:
        with tvm_build.keep_affinity(), target:
            return tvm.transform.Sequential(relax_passes(target))(mod)
    except Exception as exc:
        raise TargetError(f"TVM failed to lower the model for {target.kind.name}: "
                          f"{type(exc).__name__}: {tvm_build.error_line(exc)}") from exc


@contextmanager
def capture_plan():
    """Inside: every Relax module right after `StaticPlanBlockMemory` is kept in the yielded dict under "mod".

    Wrapped around `tvm_build.compile_module`, it yields the very plan (and kernels) that went into the compiled
    library, whatever pipeline built it, so the standalone program runs the library's own kernels.
    """
    tvm = tvm_build.tvm()
    box: dict[str, Any] = {}

    @tvm.instrument.pass_instrument
    class _Capture:
        def run_after_pass(self, mod, info):
            if info.name == "StaticPlanBlockMemory":
                box["mod"] = mod

    with tvm_build.pass_context(instruments=[_Capture()]):
        yield box


def program_from_plan(planned, names: dict[str, str] | None = None) -> Program:
    """The Program of a module captured by `capture_plan()`."""
    tvm_build.tvm()
    from tvm import relax  # noqa: PLC0415
    return walk(relax.transform.AttachGlobalSymbol()(planned), names or {})


def const_names(model) -> dict[str, str]:
    """sha256 of an initializer's bytes → its ONNX name, to name TVM's constants in memory reports."""
    from onnx import numpy_helper  # noqa: PLC0415
    out = {}
    for init in model.graph.initializer:
        try:
            out[_digest(numpy_helper.to_array(init))] = init.name
        except Exception:  # external data without a base path, odd dtypes: just unnamed
            continue
    return out


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.dtype).encode()).hexdigest()


def walk(planned, names: dict[str, str], compact: dict[str, Any] | None = None,
         as_float: set[str] = frozenset()) -> Program:
    """The Program of a planned module: interpret `main`'s bindings symbolically.

    `compact`: parameters of `main` that are weights (`weight_storage.CompactWeight` by parameter name, see
    `weight_storage.plan`): each is decoded into the scratch buffer right before every call that reads it, or,
    when its name is in `as_float`, stored as a float constant (flash) instead.
    """
    from tvm import relax  # noqa: PLC0415
    from tvm.tirx import PrimFunc  # noqa: PLC0415

    tvm = tvm_build.tvm()
    main = planned["main"]
    tir = tvm.IRModule({gv: f for gv, f in planned.functions.items() if isinstance(f, PrimFunc)})
    run = _Interpreter(names)
    compact = compact or {}
    for param in main.params:
        shape, dtype = _tensor_sinfo(param, "input")
        weight = compact.get(param.name)
        if weight is not None:
            run.env[param] = _weight_tensor(weight, shape, dtype, as_float, run.consts, run.compact_keys)
            continue
        t = run.layout.view(f"in{len(run.inputs)}", shape, dtype, run.layout.region(_nbytes(shape, dtype)),
                            label=f"input {param.name}")
        run.env[param] = t
        run.inputs.append(t)
    for block in main.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                raise TargetError(f"mcu: unsupported Relax binding {type(binding).__name__}")
            run.bind(binding.var, binding.value)
    result = run.value_of(main.body.body)
    outs = list(result) if isinstance(result, tuple) else [result]
    if any(not isinstance(o, Tensor) for o in outs):
        raise TargetError("mcu: nested tuple outputs are not supported")
    for t in outs + run.inputs:
        run.layout.use(t)
    return Program(inputs=run.inputs, outputs=outs, consts=list(run.consts.values()),
                   views=run.layout.used() + run.scratch_views, calls=run.calls, storages=run.layout.storages,
                   arena_bytes=run.layout.size, tir=tir, compact=run.compact_keys, decodes=run.decodes,
                   scratch_bytes=run.scratch)


class _Interpreter:
    """The state of `walk`: what each Relax variable is (a Tensor view, ("storage", Storage), a tuple), the
    constants met, and the kernel calls in order."""

    def __init__(self, names: dict[str, str]):
        self.names = names
        self.layout = _Layout()
        self.env: dict[Any, Any] = {}
        self.consts: dict[int, Tensor] = {}
        self.storage_of: dict[str, Storage] = {}
        self.calls: list[tuple[str, list[str]]] = []
        self.decodes: dict[int, list[tuple[str, int]]] = {}
        self.scratch_views: list[Tensor] = []
        self.scratch = 0
        self.inputs: list[Tensor] = []
        self.compact_keys: dict[str, Any] = {}

    def value_of(self, expr):
        from tvm import relax  # noqa: PLC0415
        from tvm.ir.expr import GenericConst  # noqa: PLC0415
        if isinstance(expr, relax.Var):
            if expr not in self.env:
                raise TargetError(f"mcu: unsupported Relax program: {expr.name} used before definition")
            return self.env[expr]
        if isinstance(expr, GenericConst) and hasattr(expr.value, "numpy"):
            key = expr.__chandle__()  # the node's address (a Python id() of the wrapper would be reused)
            if key not in self.consts:
                arr = expr.value.numpy()
                name = self.names.get(_digest(arr), "")
                if not name and arr.ndim == 2:  # Gemm/MatMul weights arrive transposed by FoldConstant
                    name = self.names.get(_digest(arr.T), "")
                    name = f"{name} (transposed)" if name else ""
                self.consts[key] = Tensor(f"c{len(self.consts)}", tuple(arr.shape), str(arr.dtype), "const",
                                          data=arr, label=name or f"constant {list(arr.shape)}")
            return self.consts[key]
        if isinstance(expr, relax.Tuple):
            return tuple(self.value_of(f) for f in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return self.value_of(expr.tuple_value)[expr.index]
        raise TargetError(f"mcu: unsupported Relax expression {type(expr).__name__}")

    def bind(self, var, value) -> None:
        from tvm import ir, relax  # noqa: PLC0415
        if isinstance(value, relax.Call) and isinstance(value.op, ir.Op):
            self.env[var] = self.builtin(var, value)
        elif isinstance(value, relax.Call) and isinstance(value.op, (ir.GlobalVar, relax.ExternFunc)):
            self.kernel(value)  # a TIR kernel, or a C kernel of squeeze's (mcu_int8) with the same call signature
            self.env[var] = None
        else:
            self.env[var] = self.value_of(value)

    def builtin(self, var, value):
        """A memory-planning op of the VM: storage, a tensor view in it, a fresh region, or a reshape alias."""
        op, layout = value.op.name, self.layout
        if op == "relax.memory.alloc_storage":
            return ("storage", layout.storage(int(value.args[0].values[0])))
        if op == "relax.memory.alloc_tensor":
            _, storage = self.env[value.args[0]]
            shape = tuple(int(v) for v in value.args[2].values)
            t = layout.view(f"t{len(layout.views)}", shape, str(value.args[3].value),
                            storage.offset + int(value.args[1].value))
            self.storage_of[t.key] = storage
            return t
        if op == "relax.builtin.alloc_tensor":
            shape, dtype = tuple(int(v) for v in value.args[0].values), str(value.args[1].value)
            return layout.view(f"t{len(layout.views)}", shape, dtype, layout.region(_nbytes(shape, dtype)))
        if op == "relax.reshape":
            shape, dtype = _tensor_sinfo(var, "reshape")
            return layout.alias(self.value_of(value.args[0]), shape, dtype)
        raise TargetError(f"mcu: the standalone program does not support Relax op {op} (it needs the TVM runtime)")

    def kernel(self, value) -> None:
        """A call of a kernel: its arguments are tensors; compact weights are decoded into scratch first."""
        kernel = value.op.name_hint if hasattr(value.op, "name_hint") else str(value.op.global_symbol)
        args = []
        for a in value.args:
            t = self.value_of(a)
            if not isinstance(t, Tensor):
                raise TargetError(f"mcu: kernel {kernel} takes a non-tensor argument ({type(a).__name__}); "
                                  "dynamic shapes are not supported")
            args.append(t)
        out = args[-1]
        if out.region == "arena" and not out.label:
            out.label = f"output of {kernel} {list(out.shape)} {out.dtype}"
            storage = self.storage_of.get(out.key)
            if storage is not None:
                storage.tensors.append(out.label)
        for t in args:
            if t.region == "arena":
                self.layout.use(t)
        if any(t.region == "scratch" for t in args):
            args, self.decodes[len(self.calls)], size = _scratch_views(args, len(self.calls))
            self.scratch = max(self.scratch, size)
            self.scratch_views.extend(t for t in args if t.region == "scratch")
        self.calls.append((kernel, [t.key for t in args]))


def _weight_tensor(weight, shape, dtype: str, as_float: set[str], consts: dict, compact_keys: dict) -> Tensor:
    """The tensor a compact-weight parameter stands for: a scratch view (decoded at run time) or a float constant."""
    if tuple(shape) != tuple(weight.shape) or dtype != "float32":
        raise TargetError(f"mcu: compact weight {weight.source} arrived as {list(shape)} {dtype}, expected "
                          f"{list(weight.shape)} float32")
    label = f"{weight.source} ({weight.storage})"
    if weight.name in as_float:
        key = f"c{len(consts)}"
        t = Tensor(key, tuple(shape), dtype, "const", data=weight.decode(), label=weight.source)
        consts[("param", weight.name)] = t
        return t
    key = f"w{len(compact_keys)}"
    compact_keys[key] = weight
    return Tensor(key, tuple(shape), dtype, "scratch", label=label, source=key)


def _scratch_views(args: list[Tensor], call: int) -> tuple[list[Tensor], list[tuple[str, int]], int]:
    """Per call, the compact weights it reads laid out in the scratch buffer: (its arguments with the scratch ones
    replaced by views at their offsets, the decodes to run before it, the scratch bytes it needs)."""
    offsets: dict[str, int] = {}
    size = 0
    for t in args:
        if t.region == "scratch" and t.source not in offsets:
            offsets[t.source] = size
            size = round_up(size + t.nbytes)
    views = [Tensor(f"{t.key}_k{call}_{i}", t.shape, t.dtype, "scratch", offsets[t.source], label=t.label,
                    source=t.source) if t.region == "scratch" else t for i, t in enumerate(args)]
    return views, list(offsets.items()), size


class _Layout:
    """Arena regions (inputs, planned storages, outputs) and the tensor views into them."""

    def __init__(self) -> None:
        self.size = 0
        self.views: list[Tensor] = []
        self.storages: list[Storage] = []
        self._used: dict[str, Tensor] = {}

    def region(self, nbytes: int) -> int:
        offset = self.size
        self.size = round_up(self.size + max(nbytes, 1))
        return offset

    def storage(self, nbytes: int) -> Storage:
        s = Storage(self.region(nbytes), nbytes)
        self.storages.append(s)
        return s

    def view(self, key: str, shape, dtype: str, offset: int, label: str = "") -> Tensor:
        t = Tensor(key, tuple(shape), dtype, "arena", offset, label=label)
        self.views.append(t)
        return t

    def alias(self, src: Tensor, shape, dtype: str) -> Tensor:
        t = Tensor(f"t{len(self.views)}", tuple(shape), dtype, src.region, src.offset, src.data, src.label,
                   src.source)
        if src.region == "const":
            t.key = f"{src.key}_r{len(self.views)}"
        self.views.append(t)
        return t

    def use(self, t: Tensor) -> None:
        self._used.setdefault(t.key, t)

    def used(self) -> list[Tensor]:
        return list(self._used.values())


def _tensor_sinfo(var, what: str) -> tuple[tuple[int, ...], str]:
    sinfo = var.ty
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise TargetError(f"mcu: {what} {var.name} has no static shape")
    try:
        return tuple(int(v) for v in shape.values), str(sinfo.dtype)
    except (TypeError, ValueError):
        raise TargetError(f"mcu: {what} {var.name} has a dynamic shape {shape}; give --input-shape") from None


def _itemsize(dtype: str) -> int:
    if dtype == "bool":
        return 1
    return np.dtype(dtype).itemsize


def _nbytes(shape, dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * _itemsize(dtype)


# ------------------------------------------------------------------------------------------------ kernels

def _build_kernels(program: Program, target, what: str):
    """The TVM module of the program's kernels for `target`, argument checks compiled out (they cost flash, not
    safety: squeeze's own entry point passes exactly the planned tensors)."""
    tvm = tvm_build.tvm()
    try:
        with tvm_build.keep_affinity(), tvm.transform.PassContext(config={"tirx.disable_assert": True}):
            return tvm.tirx.build(program.tir, target=target)
    except Exception as exc:
        raise TargetError(f"TVM failed to {what}: {type(exc).__name__}: {tvm_build.error_line(exc)}") from exc


def kernels_c(program: Program, target) -> str:
    """TVM's kernels as C source (target `c`)."""
    return _build_kernels(program, target, "generate C kernels").inspect_source()


def kernels_object(program: Program, target, path: Path) -> Path:
    """TVM's kernels as an object file from LLVM for `target` (e.g. aarch64 with NEON)."""
    _build_kernels(program, target, "compile the kernels").write_to_file(str(path))
    return path


def workspace_bytes(kernel_source: str) -> int:
    """Largest sum of TVMBackendAllocWorkspace sizes inside one kernel of the C source (the static pool)."""
    best = 0
    for body in re.split(r"\nTVM_DLL int32_t \w+\(", kernel_source)[1:]:
        sizes = [int(s) for s in re.findall(r"TVMBackendAllocWorkspace\([^,]+,[^,]+,\s*\(uint64_t\)(\d+)", body)]
        best = max(best, sum(round_up(s) for s in sizes))
    return best


# Runtime entry points an LLVM-compiled kernel object reaches through `__<name>` function pointers that the TVM
# runtime fills in when it loads a library; the standalone program fills them in from runtime.c.
HOOKS = ("TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace", "TVMBackendParallelLaunch",
         "TVMBackendParallelBarrier", "TVMFFIErrorSetRaisedFromCStrParts", "TVMFFIErrorSetRaisedFromCStr")


def hooks_c(pointer_symbols: list[str]) -> str:
    """hooks.c: point the object's `__TVM...` function pointers at runtime.c before main runs."""
    unknown = [s for s in pointer_symbols if s[2:] not in HOOKS]
    if unknown:
        raise TargetError(f"the kernel object needs runtime functions the standalone program lacks: "
                          f"{', '.join(s[2:] for s in unknown)}")
    lines = ["/* Generated by squeeze: fill in the kernel object's runtime function pointers. */",
             "#include <stdint.h>", "#include <tvm/runtime/c_backend_api.h>", "#include <tvm/ffi/c_api.h>"]
    lines += [f"extern void* {s};" for s in pointer_symbols]
    lines.append("__attribute__((constructor)) static void squeeze_hooks(void) {")
    lines += [f"  {s} = (void*)&{s[2:]};" for s in pointer_symbols]
    lines.append("}")
    return "\n".join(lines) + "\n"


def include_dirs() -> list[str]:
    """Header folders for TVM's generated C (tvm/runtime, tvm/ffi, dlpack)."""
    import tvm_ffi.libinfo as ffi_info  # noqa: PLC0415
    tvm = tvm_build.tvm()
    dirs = [tvm.libinfo.find_include_path(), ffi_info.find_include_path(), ffi_info.find_dlpack_include_path()]
    flat = []
    for d in dirs:
        flat.extend(d if isinstance(d, (list, tuple)) else [d])
    return list(dict.fromkeys(str(d) for d in flat))


# ------------------------------------------------------------------------------------------------ C emission

_CTYPE = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}
_DL_CODE = {"i": 0, "u": 1, "f": 2, "b": 1}


def _dl_dtype(dtype: str) -> str:
    if dtype == "bool":
        return "{1, 8, 1}"
    if dtype == "bfloat16":
        return "{4, 16, 1}"
    dt = np.dtype(dtype)
    return f"{{{_DL_CODE[dt.kind]}, {dt.itemsize * 8}, 1}}"


def c_array(name: str, arr: np.ndarray, section: str | None = None, qualifier: str = "static const") -> str:
    """`arr`'s raw bytes as a C array of unsigned words (exact for any dtype), 64-byte aligned."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    size = flat.dtype.itemsize if flat.dtype.itemsize in _CTYPE else 1
    words = flat.view(f"u{size}") if flat.size else np.zeros(1, f"u{size}")
    attrs = f"__attribute__((aligned({ALIGN})" + (f", section(\"{section}\")" if section else "") + "))"
    width = size * 2
    body = ",".join(f"0x{int(w):0{width}x}" for w in words.tolist())
    body = re.sub(r"((?:[^,]*,){16})", r"\1\n", body)
    return f"{qualifier} {_CTYPE[size]} {name}[{len(words)}] {attrs} = {{\n{body}}};\n"


def emit_model(program: Program) -> str:
    """model.c: arena, weights, tensor views and `squeeze_model_run()`."""
    lines = ["/* Generated by squeeze: the planned Relax main of the model as plain C. */",
             "#include <stddef.h>", "#include <stdint.h>", "#include <dlpack/dlpack.h>", "#include <tvm/ffi/c_api.h>",
             '#include "squeeze_model.h"', "",
             f"#define SQUEEZE_ARENA_BYTES {max(program.arena_bytes, ALIGN)}",
             f"uint8_t squeeze_arena[SQUEEZE_ARENA_BYTES] __attribute__((aligned({ALIGN})));", ""]
    for c in program.consts:
        lines.append(f"/* {c.label}: {list(c.shape)} {c.dtype}, {c.nbytes} bytes */")
        lines.append(c_array(f"{c.key}_data", c.data))
    lines += _compact_lines(program)
    all_tensors = {t.key: t for t in program.consts}
    all_tensors.update({t.key: t for t in program.views})
    for t in all_tensors.values():
        dims = ", ".join(str(d) for d in t.shape) or "1"
        data = (f"(void*)(squeeze_arena + {t.offset})" if t.region == "arena"
                else f"(void*)(squeeze_scratch + {t.offset})" if t.region == "scratch"
                else f"(void*){t.key.split('_r')[0]}_data")
        lines.append(f"static const int64_t {t.key}_shape[] = {{{dims}}};")
        lines.append(f"static const DLTensor {t.key} = {{{data}, {{kDLCPU, 0}}, {len(t.shape)}, "
                     f"{_dl_dtype(t.dtype)}, (int64_t*){t.key}_shape, NULL, 0}};")
    lines.append("")
    kernels = sorted({k for k, _ in program.calls})
    for k in kernels:
        lines.append(f"extern int32_t __tvm_ffi_{k}(void* self, void* args, int32_t num_args, void* result);")
    lines.append("")
    for i, (k, args) in enumerate(program.calls):
        items = ", ".join(f"{{.type_index = kTVMFFIDLTensorPtr, .v_ptr = (void*)&{a}}}" for a in args)
        lines.append(f"static const TVMFFIAny call{i}_args[{len(args)}] = {{{items}}};")
    lines += ["", "int squeeze_model_run(void) {", "  TVMFFIAny ret;"]
    for i, (k, args) in enumerate(program.calls):
        for key, offset in program.decodes.get(i, []):
            lines.append("  " + weight_storage.c_decode_call(program.compact[key], key,
                                                             f"squeeze_scratch + {offset}"))
        lines.append("  ret.type_index = kTVMFFINone; ret.zero_padding = 0; ret.v_int64 = 0;")
        lines.append(f"  if (__tvm_ffi_{k}(NULL, (void*)call{i}_args, {len(args)}, &ret) != 0) return {i + 1};")
    lines += ["  return 0;", "}", ""]

    def io(ts):
        return ", ".join(f"{{(void*){_data_expr(t)}, {t.nbytes}}}" for t in ts)
    lines.append(f"const squeeze_io_t squeeze_inputs[{max(len(program.inputs), 1)}] = {{{io(program.inputs)}}};")
    lines.append(f"const squeeze_io_t squeeze_outputs[{max(len(program.outputs), 1)}] = {{{io(program.outputs)}}};")
    lines.append(f"const int squeeze_num_inputs = {len(program.inputs)};")
    lines.append(f"const int squeeze_num_outputs = {len(program.outputs)};")
    lines.append(f"const char* const squeeze_kernel_names[] = {{{', '.join(chr(34) + k + chr(34) for k, _ in program.calls)}}};")
    return "\n".join(lines) + "\n"


def _compact_lines(program: Program) -> list[str]:
    """The compact weights' arrays (flash), the decode scratch (RAM) and the decoder."""
    if not program.compact:
        return []
    lines = [f"static uint8_t squeeze_scratch[{max(program.scratch_bytes, ALIGN)}] __attribute__((aligned({ALIGN})));"]
    for key, w in program.compact.items():
        lines.append(f"/* {w.source}: {list(w.shape)} as {w.storage}, {w.stored_bytes} + {w.table_bytes} bytes "
                     f"(float: {w.float_bytes}) */")
        lines += [c_array(f"{name}_data", arr) for name, arr in weight_storage.c_arrays(w, key).items()]
    lines.append(weight_storage.DECODE_C)
    return lines


def _data_expr(t: Tensor) -> str:
    return f"(squeeze_arena + {t.offset})" if t.region == "arena" else f"{t.key.split('_r')[0]}_data"


C_SOURCES = Path(__file__).with_name("c")  # the fixed C files (package data), copied into every program


def _c_source(name: str) -> str:
    return (C_SOURCES / name).read_text(encoding="utf-8")


MODEL_H = _c_source("squeeze_model.h")

RUNTIME_C = _c_source("runtime.c")

# squeeze's int8 convolution / dense for the mcu firmware (mcu_int8: SMLAD on Cortex-M DSP cores)
INT8_KERNELS_C = _c_source("int8_kernels.c")

# Cortex-M startup: vector table, reset (copy .data, zero .bss, enable the FPU, paint the stack), SysTick as a
# 64-bit counter, ARM semihosting for output and exit.
STARTUP_C = _c_source("startup.c")


def linker_script(flash_origin: int, flash_bytes: int, ram_origin: int, ram_bytes: int, stack_bytes: int) -> str:
    """Sections for the MPS2 boards: code/rodata/test data in FLASH, data/bss/stack in RAM."""
    return f"""\
/* Generated by squeeze for a QEMU MPS2 board. */
MEMORY {{
  FLASH (rx) : ORIGIN = {flash_origin:#x}, LENGTH = {flash_bytes:#x}
  RAM (rwx)  : ORIGIN = {ram_origin:#x}, LENGTH = {ram_bytes:#x}
}}
ENTRY(Reset_Handler)
SECTIONS {{
  .text : {{ KEEP(*(.vectors)) *(.text*) *(.glue_7*) *(.vfp11_veneer) *(.v4_bx) *(.init) *(.fini) }} > FLASH
  .rodata : {{ . = ALIGN(8); *(.rodata*) . = ALIGN(8); }} > FLASH
  .ARM.exidx : {{ *(.ARM.exidx*) }} > FLASH
  .squeeze_test : {{ . = ALIGN(64); KEEP(*(.squeeze_test*)) }} > FLASH
  .data : {{ . = ALIGN(8); __data_start = .; *(.data*) . = ALIGN(8); __data_end = .; }} > RAM AT > FLASH
  __data_load = LOADADDR(.data);
  .bss (NOLOAD) : {{ . = ALIGN(8); __bss_start = .; *(.bss*) *(COMMON) . = ALIGN(8); __bss_end = .; }} > RAM
  .stack (NOLOAD) : {{ . = ALIGN(8); __stack_bottom = .; . += {stack_bytes:#x}; __stack_top = .; }} > RAM
  end = .; _end = .;
  /DISCARD/ : {{ *(.ARM.attributes) *(.comment) *(.note*) }}
}}
"""


def emit_harness(program: Program, samples: list[dict[str, np.ndarray]], input_names: list[str],
                 timed_runs: int, calibrate: bool) -> str:
    """main.c: run every sample, print outputs as hex words, then time `timed_runs` runs of sample 0."""
    lines = ["/* Test harness generated by squeeze. */", "#include <stdint.h>", "#include <string.h>",
             '#include "squeeze_model.h"', ""]
    for s, feed in enumerate(samples):
        for i, name in enumerate(input_names):
            arr = np.ascontiguousarray(feed[name], dtype=program.inputs[i].dtype)
            lines.append(c_array(f"sample{s}_in{i}", arr, section=".squeeze_test"))
    rows = ", ".join("{" + ", ".join(f"sample{s}_in{i}" for i in range(len(input_names))) + "}"
                     for s in range(len(samples)))
    lines.append(f"static const void* const samples[{len(samples)}][{max(len(input_names), 1)}] = {{{rows}}};")
    lines.append(f"#define NUM_SAMPLES {len(samples)}")
    lines.append(f"#define TIMED_RUNS {timed_runs}")
    lines.append(f"#define CALIBRATE {1 if calibrate else 0}")
    lines.append(HARNESS_MAIN)
    return "\n".join(lines)


HARNESS_MAIN = _c_source("harness_main.c")


@dataclass
class RunResult:
    outputs: list[list[np.ndarray]]    # per sample, per output
    timed_runs: int
    ticks: int
    calib_ticks: int
    workspace_peak: int
    stack_used: int
    per_run: list[int] = field(default_factory=list)   # counter ticks of each timed run


def parse_run(text: str, program: Program, n_samples: int) -> RunResult:
    """Decode the harness's lines; TargetError if it reported an error or stopped early."""
    err = [ln for ln in text.splitlines() if ln.startswith("ERR")]
    if err:
        raise TargetError(f"the program failed: {err[0][4:]}")
    if "DONE" not in text:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise TargetError(f"the program stopped before finishing (output: {tail or 'none'})")
    outputs = [[None] * len(program.outputs) for _ in range(n_samples)]
    values = {}
    per_run = []
    for ln in text.splitlines():
        parts = ln.split()
        if not parts:
            continue
        if parts[0] == "OUT":
            s, o = int(parts[1]), int(parts[2])
            words = [p for p in parts[3:] if not p.startswith("x")]
            tail = bytes(int(p[1:], 16) for p in parts[3:] if p.startswith("x"))
            raw = np.array([int(w, 16) for w in words], dtype="<u4").tobytes() + tail
            t = program.outputs[o]
            outputs[s][o] = np.frombuffer(raw, dtype=np.dtype(t.dtype if t.dtype != "bool" else "u1"))[
                : int(np.prod(t.shape, dtype=np.int64))].reshape(t.shape).copy()
        elif parts[0] == "RUN":
            per_run.append(int(parts[1]))
        elif parts[0] in ("TIME", "CALIB", "WORKSPACE", "STACK"):
            values[parts[0]] = [int(p) for p in parts[1:]]
    if any(o is None for row in outputs for o in row):
        raise TargetError("the program printed fewer outputs than expected")
    return RunResult(outputs, values["TIME"][0], values["TIME"][1], values["CALIB"][1],
                     values["WORKSPACE"][0], values["STACK"][0], per_run)


def describe_consts(program: Program, n: int = 3) -> str:
    return ", ".join(f"{c.label} {_kb(c.nbytes)}" for c in program.dominant_consts(n))


def describe_storages(program: Program, n: int = 3) -> str:
    parts = []
    for s in program.dominant_storages(n):
        what = s.tensors[0] if s.tensors else "planned buffer"
        parts.append(f"{what} {_kb(s.nbytes)}")
    return ", ".join(parts)


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KiB"
