"""The Target interface and what targets return.

A target knows its TVM target, how to build an artifact from an ONNX model, and how to measure it. Every
Measurement carries its `method`, which says what its numbers are:

- `native`: run and timed on this machine;
- `rpc`: run and timed on a real device through a TVM RPC server or tracker;
- `emulated`: run under qemu (correctness only; the time is not representative);
- `opencl-cpu`: OpenCL kernels run on a CPU OpenCL implementation (correctness only);
- `instruction-count`: MCU code counted in an instruction-set simulator (counts, not cycles).
"""
from __future__ import annotations

import hashlib
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

METHODS = ("native", "rpc", "emulated", "opencl-cpu", "instruction-count")


@dataclass
class Artifact:
    """A built model: what the target needs to run it, plus files written to the output folder."""

    target: str
    handle: Any = None
    files: list[Path] = field(default_factory=list)
    build_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement:
    """What a target measured. `outputs` are per-sample outputs for the numeric check against ONNX Runtime."""

    method: str
    latency_ms: dict | None = None
    outputs: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown measurement method {self.method!r}")


class Target(ABC):
    """Base class of registered targets. Subclasses take keyword-only typed parameters in `__init__`."""

    name: ClassVar[str] = ""
    #: True when the target runs on this machine, so ONNX Runtime on the same machine is a fair baseline.
    host_native: ClassVar[bool] = False
    #: A `remote.Runner` (a device behind --rpc or --tracker/--key), set by the core before build; None = local.
    runner: Any = None

    @property
    def channel_multiple(self) -> int:
        """Channel counts this target runs best at (`--goal latency=…` rounds pruned groups to it): 1 here;
        SIMD targets answer their float32 vector width (capped at 8, so small layers can still be pruned)."""
        return 1

    def timing_method(self) -> str | None:
        """The `method` this target's latency will carry with the current runner: `native` or `rpc` are real
        times; `emulated`, `opencl-cpu` and `instruction-count` are not; None: compile-only (no time at all)."""
        if self.runner is not None:
            return "rpc"
        return "native" if self.host_native else None

    def missing(self) -> str | None:
        """None if the target can build and measure here, else what is missing and how to install it."""
        return None

    @abstractmethod
    def tvm_target(self) -> Any:
        """The `tvm.target.Target` this target compiles for."""

    @abstractmethod
    def build(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], workdir: Path) -> Artifact:
        """Compile `model` (inputs of the given concrete shapes); write any artifact files under `workdir`."""

    @abstractmethod
    def measure(self, artifact: Artifact, samples: list[dict[str, np.ndarray]], runs: int) -> Measurement:
        """Run every sample once for outputs, then time the first one `runs` times after warm-up."""


def build_folder(workdir: Path, stem: str, model: onnx.ModelProto) -> Path:
    """OUTDIR/<stem>-<model digest>: the compressed and the original model build side by side."""
    base = Path(workdir)
    if base.resolve() == Path.cwd().resolve():  # the API without an output folder: never litter the cwd
        base = Path(tempfile.mkdtemp(prefix="squeeze-"))
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()[:8]
    folder = base / f"{stem}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def relative(path: Path, base: Path) -> str:
    """`path` relative to the output folder (the report must not name the staging folder)."""
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)
