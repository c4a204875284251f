"""What a pass gets besides the graph: calibration data, the seed, and a place for notes and details."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .data import Dataset


@dataclass
class Context:
    """Per-pass context. `model` is the (verified) model the pass starts from, for running calibration data.

    `note()` records a sentence for the report (a node skipped and why, a ratio rounded); `details` holds
    structured per-pass results (per-layer tables) that the report renders.
    """

    calib: Dataset
    seed: int = 0
    model: onnx.ModelProto | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    threads: int | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def skipped(self, skipped: dict[str, str], what: str) -> None:
        """Record the layers a pass left alone (name → reason) in `details["skipped"]` and as one note that starts
        with `what` ("left in float"); nothing when there are none."""
        if skipped:
            self.details["skipped"] = skipped
            self.note(f"{what}: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))

    @property
    def calib_is_synthetic(self) -> bool:
        return self.calib.source.startswith("synthetic")
