"""`mcu`: bare-metal Cortex-M4/M7. TVM lowers the model to C kernels; squeeze emits the rest of the firmware.

TVM 0.27 has no AOT executor, so `c_program` walks the memory-planned Relax `main` and writes a C entry point
over one static arena with the weights as `const` arrays (flash). `arm-none-eabi-gcc` builds it for the board's
core; QEMU runs it on an MPS2 FPGA board model (`mps2-an386`: Cortex-M4, `mps2-an500`: Cortex-M7) with
semihosting and `-icount`, so the outputs are checked against ONNX Runtime and the instructions counted
(`method=instruction-count`: an instruction count, not cycles — on silicon, wait states, pipeline stalls and
the memory system make cycles differ).

Compute (`compute=`): `auto` (default) runs a `quant` model's int8 Conv/Gemm/MatMul layers — those the CPU's
int8 path computes exactly, same pattern — in squeeze's int8 C kernels (`mcu_int8`: CMSIS-NN style, SMLAD on the
DSP extension of Cortex-M4/M7; ONNX Runtime's requantization) on their int8 weights as they are in flash; `float`
computes every layer in TVM's float kernels. Everything else (pools, activations, a float layer) is TVM's.

Weights (`weights=`) of the layers that compute in float: `compact` keeps what the passes made compact in flash — a
`quant` model's int8 (or k-bit) integers with their scales, a `codebook` model's bit-packed indices with the
codebook — and decodes each weight into a RAM scratch buffer right before the layer that reads it
(`weight_storage`); `float` stores them as float32, as TVM folds them; `auto` (default) is `compact`, except that
when the decode scratch would overflow the board's RAM the largest decoded weights stay float (flash traded back for
RAM), one at a time until it fits. The report lists per layer the storage, compute type and MACs.

Flash = text + rodata + initialised data of a firmware that runs the model once (startup, runtime hooks, kernels,
weights), broken down from the ELF's symbols into code, float weights, compact weights, tables (scales, zero points,
codebooks) and the rest; RAM = data + bss (arena, decode scratch, workspace pool) + the stack's measured
high-water mark. A named board whose flash or RAM is too small fails with the tensors that dominate.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import onnx

from squeeze.errors import TargetError
from squeeze.registry import Range, register_target

from . import c_program, mcu_int8, toolchains, tvm_build, weight_storage
from .base import Artifact, Measurement, Target, build_folder, relative

KiB = 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class Board:
    cpu: str            # gcc -mcpu and the emulated core
    flash: int          # bytes
    ram: int            # bytes
    clock_mhz: int      # for the note only: instructions are not cycles
    machine: str        # the QEMU board that runs it (same core)
    note: str = ""


# Flash/RAM from the vendors' datasheets (RAM: all on-chip SRAM the linker can use for data, CCM included).
BOARDS = {
    "mps2-an386": Board("cortex-m4", 4 * MiB, 4 * MiB, 25, "mps2-an386", "the emulated board itself"),
    "mps2-an500": Board("cortex-m7", 4 * MiB, 4 * MiB, 25, "mps2-an500", "the emulated board itself"),
    "stm32f401": Board("cortex-m4", 512 * KiB, 96 * KiB, 84, "mps2-an386"),
    "stm32f407": Board("cortex-m4", 1 * MiB, 192 * KiB, 168, "mps2-an386", "128 KiB SRAM + 64 KiB CCM"),
    "stm32f446": Board("cortex-m4", 512 * KiB, 128 * KiB, 180, "mps2-an386"),
    "stm32l476": Board("cortex-m4", 1 * MiB, 128 * KiB, 80, "mps2-an386"),
    "nrf52840": Board("cortex-m4", 1 * MiB, 256 * KiB, 64, "mps2-an386"),
    "stm32f746": Board("cortex-m7", 1 * MiB, 320 * KiB, 216, "mps2-an500"),
    "stm32h743": Board("cortex-m7", 2 * MiB, 1 * MiB, 480, "mps2-an500"),
}
BoardName = Literal["mps2-an386", "mps2-an500", "stm32f401", "stm32f407", "stm32f446", "stm32l476", "nrf52840",
                    "stm32f746", "stm32h743"]

FPU = {"cortex-m4": ["-mfpu=fpv4-sp-d16"], "cortex-m7": ["-mfpu=fpv5-d16"]}
# The QEMU MPS2 boards: 4 MiB SSRAM1 at 0 (holds the image, "flash") and 4 MiB SSRAM2/3 at 0x20000000 (RAM).
EMU_FLASH = (0x00000000, 4 * MiB)
EMU_RAM = (0x20000000, 4 * MiB)
STACK_BYTES = 64 * KiB
STACK_RESERVE = 8 * KiB   # `auto` weights: RAM left for the stack when it decides what fits


@register_target("mcu")
class Mcu(Target):
    def timing_method(self) -> str | None:
        return "instruction-count"  # qemu counts instructions, never cycles, with or without --rpc

    """Bare-metal Cortex-M: TVM C kernels + squeeze's static-arena entry point, run in QEMU (instruction count)."""

    def __init__(self, *, board: Annotated[BoardName, "board preset: core, flash and RAM (see docs)"] = "mps2-an386",
                 opt: Annotated[Literal["O2", "Os", "O3"], "arm-none-eabi-gcc optimisation level"] = "O2",
                 runs: Annotated[int, Range(1, 1000), "timed runs in the emulator (counts are deterministic)"] = 3,
                 timeout: Annotated[int, Range(10, 3600), "seconds before the emulator run is abandoned"] = 300,
                 weights: Annotated[Literal["auto", "compact", "float"], "weights in flash: compact (int8 / packed "
                                    "codebook indices, decoded per layer into RAM), float, or auto (compact while "
                                    "the decode scratch fits the board's RAM)"] = "auto",
                 compute: Annotated[Literal["auto", "float"], "auto: a quant model's int8 Conv/Gemm/MatMul layers "
                                    "run squeeze's int8 C kernels (SMLAD on DSP cores), int8 weights in flash; "
                                    "float: every layer in TVM's float kernels"] = "auto"):
        self.weights = weights
        self.compute = compute
        self.board_name = board
        self.board = BOARDS[board]
        self.opt = opt
        self.runs = runs
        self.timeout = timeout

    def missing(self) -> str | None:
        gone = toolchains.missing("mcu")
        if gone:
            return f"mcu: {gone}"
        if not toolchains.newlib_present():
            return f"mcu: newlib for arm-none-eabi not found; {toolchains.install_hint('mcu')}"
        return None

    def tvm_target(self):
        tvm = tvm_build.tvm()
        return tvm.target.Target({"kind": "c", "mcpu": self.board.cpu})

    def cflags(self) -> list[str]:
        return ([f"-mcpu={self.board.cpu}", "-mthumb", "-mfloat-abi=hard", *FPU[self.board.cpu], f"-{self.opt}",
                 "-ffunction-sections", "-fdata-sections", "-fno-common", "-Wno-unused-variable",
                 "-Wno-unused-but-set-variable"] + [f"-I{d}" for d in c_program.include_dirs()])

    # -------------------------------------------------------------------------------------------- build

    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        start = time.perf_counter()
        target = self.tvm_target()
        mod, integer = self._integer_layers(model, shapes)
        storage = weight_storage.plan(model, leave=integer) if self.weights != "float" else \
            weight_storage.Plan(model, [])
        if mod is None or storage.model is not model:  # else the model as imported is the model to build
            mod = tvm_build.import_onnx(storage.model, {**shapes, **storage.input_shapes})
            if self.compute == "auto":
                mod, _ = mcu_int8.rewrite(mod)
        planned = c_program.plan_module(mod, target)
        names = c_program.const_names(model)
        compact = {w.name: w for w in storage.weights}
        program = c_program.walk(planned, names, compact)
        source = c_program.kernels_c(program, target)
        workspace = c_program.workspace_bytes(source)
        as_float = self._float_for_ram(program, workspace) if self.weights == "auto" else []
        if as_float:
            program = c_program.walk(planned, names, compact, set(as_float))
        self._check_fit(program, flash=program.flash_data_bytes,
                        ram=program.arena_bytes + program.scratch_bytes + workspace, estimate=True)

        folder = build_folder(workdir, f"mcu-{self.board_name}", model)
        files = {"squeeze_model.h": c_program.MODEL_H, "model.c": c_program.emit_model(program),
                 "kernels.c": source, "runtime.c": c_program.RUNTIME_C, "startup.c": c_program.STARTUP_C,
                 "firmware.ld": c_program.linker_script(*EMU_FLASH, *EMU_RAM, STACK_BYTES),
                 "deploy_main.c": DEPLOY_MAIN}
        flags = {"runtime.c": [f"-DSQUEEZE_WORKSPACE_BYTES={max(workspace, 64)}"]}
        im2col = mcu_int8.im2col_bytes(program)
        if im2col:
            files[mcu_int8.SOURCE] = c_program.INT8_KERNELS_C
            flags[mcu_int8.SOURCE] = [f"-DSQUEEZE_IM2COL_BYTES={im2col}", "-ffp-contract=off"]
        for name, text in files.items():
            (folder / name).write_text(text)
        objects = []
        for name in [n for n in files if n.endswith(".c") and n != "deploy_main.c"]:
            obj = folder / (name[:-2] + ".o")
            toolchains.run_tool(["arm-none-eabi-gcc", *self.cflags(), *flags.get(name, []), "-c", name, "-o",
                                 obj.name], what=f"arm-none-eabi-gcc {name}", cwd=folder)
            objects.append(obj)
        elf = self._link(folder, objects, "deploy_main.c", "firmware.elf")
        sizes = section_sizes(elf)
        flash = sizes["text"] + sizes["rodata"] + sizes["data"]
        static_ram = sizes["data"] + sizes["bss"]
        self._check_fit(program, flash=flash, ram=static_ram, estimate=False)
        info = {"tvm_target": str(target), "board": self.board_name, "cpu": self.board.cpu,
                "emulator": f"qemu-system-arm -M {self.board.machine}", "artifact_dir": relative(folder, workdir)}
        symbols = symbol_sizes(elf)
        memory = {"flash_bytes": flash, "ram_static_bytes": static_ram, "arena_bytes": program.arena_bytes,
                  "workspace_pool_bytes": workspace, "weights_bytes": program.flash_data_bytes,
                  "decode_scratch_bytes": program.scratch_bytes if program.compact else 0,
                  "kernels": len({k for k, _ in program.calls}), "calls": len(program.calls),
                  "board_flash_bytes": self.board.flash, "board_ram_bytes": self.board.ram}
        weights = {"mode": self.weights, "compact": len(program.compact), "float_for_ram": as_float,
                   "kept_float": storage.kept, "why": _weights_why(self.weights, storage, program, as_float, integer)}
        layers = weight_storage.layer_rows(model, shapes, storage, set(as_float), integer)
        info.update(_compute_summary(layers))
        names = [i.name for i in model.graph.input if i.name in shapes]
        return Artifact(self.name, handle={"program": program, "folder": folder, "objects": objects,
                                           "flash": flash, "static_ram": static_ram, "names": names,
                                           "memory": memory, "symbols": symbols, "sizes": sizes,
                                           "weights": weights, "layers": layers},
                        files=[folder / n for n in files] + [elf], build_seconds=tvm_build.seconds_since(start),
                        info=info)

    def _integer_layers(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]):
        """`compute=auto` on a model with DequantizeLinear nodes: (the model imported with its int8 layers as kernel
        calls, the weights — DequantizeLinear outputs — those layers read, name → why `weight_storage` leaves them
        as they are: int8 constants in flash); else (None, {})."""
        if self.compute != "auto" or not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
            return None, {}
        mod, consumed = mcu_int8.rewrite(tvm_build.import_onnx(model, shapes))
        return mod, weight_storage.dequantized(model, consumed)

    def _float_for_ram(self, program: c_program.Program, workspace: int) -> list[str]:
        """`auto`: the compact weights to store as float instead, largest decoded first, until the arena, the decode
        scratch and the workspace fit the board's RAM (with room for the stack); none when they already fit."""
        chosen: list[str] = []
        compact = dict(program.compact)
        def needed() -> int:
            return program.arena_bytes + workspace + _scratch_without(program, chosen) + STACK_RESERVE
        while compact and needed() > self.board.ram:
            key = max(compact, key=lambda k: compact[k].float_bytes)
            chosen.append(compact.pop(key).name)
        return chosen

    def _link(self, folder: Path, objects: list[Path], main_c: str, out: str) -> Path:
        toolchains.run_tool(["arm-none-eabi-gcc", *self.cflags(), "-nostartfiles", "-T", "firmware.ld",
                             "-Wl,--gc-sections", f"-Wl,-Map={out[:-4]}.map", "--specs=nano.specs",
                             "--specs=nosys.specs", main_c, *[o.name for o in objects], "-lm", "-o", out],
                            what=f"linking {out}", cwd=folder)
        return folder / out

    def _check_fit(self, program: c_program.Program, *, flash: int, ram: int, estimate: bool) -> None:
        board = self.board
        problems = []
        if flash > board.flash:
            problems.append(f"flash {_kib(flash)} > {_kib(board.flash)} (largest weights: "
                            f"{c_program.describe_consts(program)})")
        if ram > board.ram:
            problems.append(f"RAM {_kib(ram)} > {_kib(board.ram)} (largest activation buffers: "
                            f"{c_program.describe_storages(program)})")
        if problems:
            what = "at least" if estimate else ""
            raise TargetError(f"mcu: the model does not fit {self.board_name} ({board.cpu}): needs {what} "
                              + "; ".join(problems) + ". Compress further (prune, quant, codebook) or pick a "
                              "bigger board")

    # -------------------------------------------------------------------------------------------- measure

    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        handle = artifact.handle
        program: c_program.Program = handle["program"]
        folder: Path = handle["folder"]
        names = handle["names"]
        (folder / "test_main.c").write_text(c_program.emit_harness(program, samples, names, self.runs,
                                                                      calibrate=True))
        elf = self._link(folder, handle["objects"], "test_main.c", "test_firmware.elf")
        cmd = ["qemu-system-arm", "-M", self.board.machine, "-cpu", self.board.cpu, "-nographic", "-monitor", "none",
               "-serial", "none", "-semihosting-config", "enable=on,target=native", "-icount", "shift=0",
               "-kernel", elf.name]
        text = toolchains.run_tool(cmd, what=f"qemu-system-arm -M {self.board.machine}", cwd=folder,
                                   timeout=self.timeout, check=False)
        result = c_program.parse_run(text, program, len(samples))
        stacked = {str(i): np.stack([row[i] for row in result.outputs]) for i in range(len(program.outputs))}
        per_tick = 2_000_000 / result.calib_ticks if result.calib_ticks else None
        ticks = result.ticks / result.timed_runs
        instructions = int(round(ticks * per_tick)) if per_tick else None
        ram = handle["static_ram"] + result.stack_used
        memory = dict(handle["memory"], ram_bytes=ram, stack_bytes=result.stack_used,
                      workspace_peak_bytes=result.workspace_peak)
        notes = [f"instruction count from QEMU -icount on {self.board.machine} ({self.board.cpu}); not cycles: "
                 f"on silicon, flash wait states, pipeline stalls and the FPU make cycles differ "
                 f"(at {self.board.clock_mhz} MHz and 1 instruction/cycle it would be "
                 f"{instructions / (self.board.clock_mhz * 1e3):.2f} ms)" if instructions else
                 "instruction count unavailable (counter calibration failed)"]
        if ram > self.board.ram:
            raise TargetError(f"mcu: the model does not fit {self.board_name}: RAM {_kib(ram)} (static "
                              f"{_kib(handle['static_ram'])} + stack {_kib(result.stack_used)}) > "
                              f"{_kib(self.board.ram)}; largest activation buffers: "
                              f"{c_program.describe_storages(program)}")
        extra = {"flash_bytes": handle["flash"], "ram_bytes": ram, "instructions": instructions,
                 "memory": memory, "emulated_runs": result.timed_runs,
                 "flash_breakdown": flash_breakdown(handle["sizes"], handle["symbols"], program),
                 "ram_breakdown": ram_breakdown(handle["sizes"], handle["symbols"], program, result.stack_used),
                 "weights": handle["weights"], "layers": handle["layers"]}
        return Measurement("instruction-count", latency_ms=None, outputs=stacked, notes=notes, extra=extra)


DEPLOY_MAIN = """\
/* What a deployment links: run the model once. The application copies its input into squeeze_inputs[i].data
   and reads squeeze_outputs[o].data after squeeze_model_run() returns 0. */
#include "squeeze_model.h"
int main(void) { return squeeze_model_run(); }
"""


def symbol_sizes(elf: Path) -> dict[str, int]:
    """Size of every defined symbol of a firmware ELF (arm-none-eabi-nm -S), by name."""
    out = toolchains.run_tool(["arm-none-eabi-nm", "-S", "--defined-only", str(elf)], what="arm-none-eabi-nm")
    sizes: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            sizes[parts[3]] = sizes.get(parts[3], 0) + int(parts[1], 16)
    return sizes


# model.c's symbols (c_program.emit_model): constants c<i>_data (float weights, or the int8 kernels' weights and
# tables), compact weights w<i>_q_data and their tables w<i>_table_data / w<i>_zero_data / w<i>_scale_data.
_FLASH_PARTS = (("weights_float", re.compile(r"c\d+_data")), ("weights_compact", re.compile(r"w\d+_q_data")),
                ("tables", re.compile(r"w\d+_(table|zero|scale)_data")))


def flash_breakdown(sizes: dict[str, int], symbols: dict[str, int], program: c_program.Program | None = None
                    ) -> dict[str, int]:
    """Flash bytes as code (.text), float weights, compact weights, tables (scales, zero points, codebooks) and
    other (tensor descriptors, call tables, kernel constants, initialised data); the parts add up to the flash.
    The int8 kernels' constants (`program`'s calls) count as compact weights (int8) and tables (bias, scales)."""
    integer = {}
    if program is not None:
        integer = {**{f"{k}_data": "weights_compact" for k in mcu_int8.weight_consts(program)},
                   **{f"{k}_data": "tables" for k in mcu_int8.table_consts(program)}}
    parts = dict.fromkeys((name for name, _ in _FLASH_PARTS), 0)
    for symbol, n in symbols.items():
        part = integer.get(symbol) or next((p for p, pattern in _FLASH_PARTS if pattern.fullmatch(symbol)), None)
        if part is not None:
            parts[part] += n
    total = sizes["text"] + sizes["rodata"] + sizes["data"]
    out = {"code": sizes["text"], **parts}
    out["other"] = total - sum(out.values())
    return out


def ram_breakdown(sizes: dict[str, int], symbols: dict[str, int], program: c_program.Program,
                  stack: int) -> dict[str, int]:
    """RAM bytes as activations (the arena less I/O), I/O (inputs and outputs, in the arena), decode scratch,
    the int8 kernels' im2col columns, workspace pool, other static data and the measured stack; the parts add up
    to the RAM."""
    arena = symbols.get("squeeze_arena", 0)
    io = min(program.io_bytes, arena)
    out = {"activations": arena - io, "io": io, "decode_scratch": symbols.get("squeeze_scratch", 0),
           "im2col": symbols.get("squeeze_im2col", 0), "workspace_pool": symbols.get("ws_pool", 0)}
    out["other_static"] = sizes["data"] + sizes["bss"] - sum(out.values())
    out["stack"] = stack
    return out


def _scratch_without(program: c_program.Program, as_float: list[str]) -> int:
    """The decode scratch when the weights named in `as_float` are float constants instead."""
    gone = {k for k, w in program.compact.items() if w.name in as_float}
    best = 0
    for decodes in program.decodes.values():
        size = 0
        for key, _ in decodes:
            if key not in gone:
                size = c_program.round_up(size + program.compact[key].float_bytes)
        best = max(best, size)
    return best


def _weights_why(mode: str, storage: weight_storage.Plan, program: c_program.Program, as_float: list[str],
                 integer: dict[str, str]) -> str:
    """One line for the report: what was stored how, and why."""
    parts = [f"{len(integer)} weight(s) int8 in flash, read as they are by the int8 kernels"] if integer else []
    if mode == "float":
        parts.append("weights=float: every other weight stored as float32 (TVM folds the decode at compile time)")
    elif storage.weights:
        text = (f"{len(program.compact)} weight(s) compact in flash, decoded per layer into a "
                f"{program.scratch_bytes} B RAM scratch")
        if as_float:
            text += f"; {len(as_float)} kept float so the decode scratch fits the board's RAM"
        parts.append(text)
    elif not integer:
        parts.append("no weight has an exact compact form (float model): float32 in flash")
    return "; ".join(parts)


def _compute_summary(layers: list[dict]) -> dict:
    """The row's compute fields (as `schedules.int8.compute_summary` gives the cpu rows) from the layer table."""
    weighted = [r for r in layers if r["op"] in weight_storage.WEIGHT_SLOT]
    n8 = sum(r["compute"] == "int8" for r in weighted)
    n32 = len(weighted) - n8
    return {"compute": "int8" if n8 and not n32 else "mixed" if n8 else "float", "int8_layers": n8,
            "float_layers": n32, "instruction": "SMLAD (Cortex-M DSP), squeeze's C kernels" if n8 else None}


def section_sizes(elf: Path) -> dict[str, int]:
    """text / rodata / data / bss / test bytes of a firmware ELF (arm-none-eabi-size -A)."""
    out = toolchains.run_tool(["arm-none-eabi-size", "-A", "-d", str(elf)], what="arm-none-eabi-size")
    sizes = {"text": 0, "rodata": 0, "data": 0, "bss": 0, "test": 0}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        name, size = parts[0], int(parts[1])
        if name == ".text":
            sizes["text"] += size
        elif name in (".rodata", ".ARM.exidx"):
            sizes["rodata"] += size
        elif name == ".data":
            sizes["data"] += size
        elif name == ".bss":
            sizes["bss"] += size
        elif name == ".squeeze_test":
            sizes["test"] += size
    return sizes


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"
