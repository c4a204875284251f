"""The sensitivity and cost tables the allocation reads, as data: knobs (`Knob`), layer costs (`LayerCost`), the
whole (`Tables`); the samples they are measured on (`table_samples`); their disk cache; and `measure_tables`,
which asks the plug-in that measures them (`passes/goal_tables.py`, the hook "goal-tables") — the measuring runs
the passes, so it lives beside them, and the core never imports a pass by name."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..data import HOLDOUT_EVERY, Dataset, holdout
from ..registry import hook
from .spec import Goal

CACHE_VERSION = 3
PRUNE_LEVELS = (0.25, 0.5, 0.75)        #: fractions of a group removed in the sensitivity tables
LOWRANK_LEVELS = (0.75, 0.5, 0.375, 0.25)  #: kept rank (fraction of full rank) of a low-rank implant, per layer
CODEBOOK_BITS = (8, 6, 5, 4, 3, 2, 1)   #: index widths measured per layer (0 = left in float)
HOLDOUT_SAMPLES = 256                   #: calibration samples the tables come from (every 4th is held out)


@dataclass
class Knob:
    """One allocation decision: a channel group (`prune`: choices = channels kept), a weight layer
    (`codebook`: choices = index bits, 0 = float) or a layer's low-rank implant (`lowrank`: choices = kept rank
    as a fraction of full rank, 0 = not factorized). `loss[i]` is the measured output loss of choice i alone;
    `latency_saved[i]` (latency goals) the measured seconds saved on the goal's target; `macs_kept[i]` and
    `params_kept[i]` (lowrank) the layer's measured MACs and parameters after the implant, as fractions."""

    kind: str
    name: str
    choices: list[float]
    loss: list[float]
    size: int = 0
    latency_saved: list[float] | None = None
    macs_kept: list[float] | None = None
    params_kept: list[float] | None = None


@dataclass
class LayerCost:
    """A weight layer's share of the model's bytes and MACs, and which channel groups shrink it.

    `ins`/`outs`: {group: c} such that cutting r channels of the group removes the fraction r·c of the layer's
    input (output) channels. `bits`, `fixed`: packed bits per parameter, and bytes that do not shrink with the
    channels (decoder tables, headers), when clustered at each index width (measured at two sizes); `float_bits`:
    as stored now."""

    name: str
    params: int
    macs: int
    float_bits: float
    bits: dict[int, float] = field(default_factory=dict)
    ins: dict[str, float] = field(default_factory=dict)
    outs: dict[str, float] = field(default_factory=dict)
    fixed: dict[int, float] = field(default_factory=dict)


@dataclass
class Tables:
    knobs: list[Knob]
    layers: list[LayerCost]
    base: dict[str, float]       # the model the plan starts from: packed bytes, macs, latency (seconds)
    other: dict[str, float]      # what no knob changes: bytes and MACs outside the layers
    seconds: float = 0.0         # spent measuring (0 for parts read from the cache)
    cached: bool = False         # every part came from the cache


def measure_tables(model: onnx.ModelProto, goal: Goal, calib: Dataset, shapes: dict[str, tuple[int, ...]], *,
                   seed: int, threads: int | None, say: Callable[[str], None], target_latency=None,
                   latency_key: str | None = None, multiple: int = 1, cache: bool = True) -> Tables:
    """Sensitivity and cost tables of `model` for `goal` (see squeeze.goal), each part from the cache when there.

    `target_latency`: model → seconds on the goal's target (latency goals), `latency_key` names that target and
    device in the cache key; `multiple`: the channel multiple groups are cut in."""
    return hook("goal-tables")(model, goal, calib, shapes, seed=seed, threads=threads, say=say,
                               target_latency=target_latency, latency_key=latency_key, multiple=multiple,
                               cache=cache)


def table_samples(calib: Dataset) -> Dataset:
    """The samples losses are measured on: of the first HOLDOUT_SAMPLES calibration samples, the held-out ones
    (every 4th, `squeeze.data.holdout`), or all of them when there are too few to hold any out."""
    data = calib.subset(0, min(len(calib), HOLDOUT_SAMPLES))
    n = len(data)
    held = holdout(n) if n >= 2 * HOLDOUT_EVERY else np.ones(n, bool)
    return Dataset({k: v[held] for k, v in data.arrays.items()}, None, data.source, dict(data.stacked))


# ---------------------------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """$SQUEEZE_CACHE, else ~/.cache/squeeze."""
    root = os.environ.get("SQUEEZE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "squeeze"


CODE_VERSIONS: dict[tuple[str, ...], str] = {}   #: package names → digest, computed once per process


def code_version(packages: tuple[str, ...] = ("squeeze", "squeeze.passes")) -> str:
    """A digest of the source of what measures the tables: every module of the core (its subpackages such as
    this one included) and of the passes (the targets too for latency tables), and squeeze's version. An edit to
    any of them is a new version, so tables measured by other code are never read back."""
    if packages not in CODE_VERSIONS:
        import importlib  # noqa: PLC0415
        import importlib.metadata  # noqa: PLC0415
        h = hashlib.sha256()
        try:
            h.update(importlib.metadata.version("squeeze").encode())
        except importlib.metadata.PackageNotFoundError:
            pass
        for name in packages:
            folder = Path(importlib.import_module(name).__file__).parent
            for f in sorted(folder.rglob("*.py")):
                rel = f.relative_to(folder).as_posix()
                h.update(f"{name}/{rel}".encode() + hashlib.sha256(f.read_bytes()).digest())
        CODE_VERSIONS[packages] = h.hexdigest()[:16]
    return CODE_VERSIONS[packages]


def cache_path(model: onnx.ModelProto, calib: Dataset, seed: int, part: str, extra: list,
               latency_key: str | None = None) -> Path:
    """One file per table part, keyed by the model, the calibration samples used, the seed, the part's
    settings (prune: channel multiple and criterion; codebook: the bit widths), the code that measures it
    (`code_version`) and, for latency tables, the target and the device it timed on (`latency_key`)."""
    h = hashlib.sha256()
    h.update(code_version(("squeeze", "squeeze.passes", "squeeze.targets") if latency_key else
                          ("squeeze", "squeeze.passes")).encode())
    h.update(json.dumps(latency_key).encode())
    h.update(model.SerializeToString(deterministic=True))
    for name in sorted(calib.arrays):
        arr = np.ascontiguousarray(calib.arrays[name][:HOLDOUT_SAMPLES])
        h.update(name.encode() + str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes())
    h.update(json.dumps([CACHE_VERSION, seed, part, extra]).encode())
    return cache_root() / "goal" / f"{h.hexdigest()[:24]}-{part}.json"


def read_cache(path: Path, enabled: bool) -> dict | None:
    """A table part written by `write_cache`, or None (caching off, no file, another CACHE_VERSION, damaged)."""
    if not enabled or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return data if data.get("version") == CACHE_VERSION else None
    except (OSError, ValueError):
        return None  # a damaged cache file is measured again and replaced


def write_cache(path: Path, data: dict) -> None:
    """Write atomically (a reader never sees half a file); a read-only cache only costs the next run the
    measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".goal-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass


class Progress:
    """`[#####-----] 12/40 what · 0:31 elapsed, ~0:50 left` through the CLI's status line."""

    def __init__(self, say: Callable[[str], None], total: int, label: str):
        self.say, self.total, self.label, self.done, self.start = say, max(total, 1), label, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        frac = min(1.0, self.done / self.total)
        elapsed = time.perf_counter() - self.start
        left = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        self.say(f"goal: {self.label} [{bar}] {self.done}/{self.total} {what} · {_clock(elapsed)} elapsed, "
                 f"~{_clock(left)} left")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"
