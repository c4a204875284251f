"""`--goal` text → a `Goal`: budgets (`size=8x`, `bytes=200k`, `macs=0.5`, `latency=1.5x@cpu`), the passes it may
use (`using=prune+lowrank+codebook`) and how codebook losses are predicted (`sensitivity=measured|hessian`)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import SpecError
from ..registry import get_target

KNOBS = ("prune", "lowrank", "codebook")   #: the passes a goal can allocate (using=)
METRICS = ("bytes", "macs", "latency")
NEEDS_CALIB = ("--goal needs --calib with real inputs: the sensitivities it allocates by are measured on "
               "calibration data")


@dataclass(frozen=True)
class Constraint:
    """One budget: `metric` (bytes, macs, latency) at most `limit(original)`."""

    metric: str
    ratio: float | None = None      # N× smaller / faster than the original
    absolute: float | None = None   # bytes
    target: str | None = None       # latency: the target spec it is measured on
    text: str = ""

    def limit(self, original: float) -> float:
        return self.absolute if self.absolute is not None else original / float(self.ratio)


@dataclass(frozen=True)
class Goal:
    constraints: tuple[Constraint, ...]
    using: tuple[str, ...]
    text: str
    sensitivity: str = "measured"   # codebook losses: "measured" (each layer clustered alone) or "hessian"

    @property
    def latency(self) -> Constraint | None:
        return next((c for c in self.constraints if c.metric == "latency"), None)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 2**20,
               "g": 1e9, "gb": 1e9, "gib": 2**30}


def parse_goal(text: str) -> Goal:
    """`size=8x`, `bytes=200k`, `macs=0.5` (fraction) or `macs=2x`, `latency=1.5x@cpu`, joined by commas;
    `using=prune+lowrank+codebook` picks the passes (default: prune and codebook for size goals, prune
    otherwise);
    `sensitivity=hessian` predicts the codebook losses from Hessian traces (squeeze.passes.hessian) instead of
    measuring every layer at every width."""
    parts = [p.strip() for p in _split_top(text or "") if p.strip()]
    if not parts:
        raise SpecError("--goal is empty: give e.g. size=8x, bytes=200k, macs=0.5 or latency=1.5x@cpu")
    constraints: list[Constraint] = []
    using: tuple[str, ...] | None = None
    sensitivity = "measured"
    for part in parts:
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise SpecError(f"--goal {part!r}: expected key=value (size=8x, bytes=200k, macs=0.5, latency=1.5x@cpu)")
        if key == "size":
            constraints.append(Constraint("bytes", ratio=_ratio(part, value), text=part))
        elif key == "bytes":
            m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", value)
            if not m or m.group(2).lower() not in _SIZE_UNITS or float(m.group(1)) <= 0:
                raise SpecError(f"--goal {part!r}: bytes must be a positive size like 250000, 200k, 1.5M or 2MiB")
            constraints.append(Constraint("bytes", absolute=float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()],
                                          text=part))
        elif key == "macs":
            if value.lower().endswith("x"):
                constraints.append(Constraint("macs", ratio=_ratio(part, value), text=part))
            else:
                fraction = _number(part, value)
                if not 0 < fraction < 1:
                    raise SpecError(f"--goal {part!r}: macs=F keeps a fraction F of the MACs, 0 < F < 1 "
                                    "(or write macs=2x)")
                constraints.append(Constraint("macs", ratio=1.0 / fraction, text=part))
        elif key == "latency":
            speed, at, target = value.partition("@")
            if not at or not target.strip():
                raise SpecError(f"--goal {part!r}: say where latency is measured, e.g. latency=1.5x@cpu")
            get_target(re.split(r"[(\s]", target.strip(), maxsplit=1)[0])  # unknown target: one-line error
            constraints.append(Constraint("latency", ratio=_ratio(part, speed), target=target.strip(), text=part))
        elif key == "using":
            names = tuple(n.strip() for n in re.split(r"[+ ]", value) if n.strip())
            bad = [n for n in names if n not in KNOBS]
            if bad or not names:
                raise SpecError(f"--goal {part!r}: using= takes {', '.join(KNOBS[:-1])} and/or {KNOBS[-1]} "
                                "joined by '+'")
            using = names
        elif key == "sensitivity":
            if value not in ("measured", "hessian"):
                raise SpecError(f"--goal {part!r}: sensitivity= is measured or hessian")
            sensitivity = value
        else:
            raise SpecError(f"--goal: unknown key {key!r}; use size=, bytes=, macs=, latency=, using= or "
                            "sensitivity=")
    if not constraints:
        raise SpecError("--goal names no budget: add size=, bytes=, macs= or latency=")
    if sum(c.metric == "latency" for c in constraints) > 1:
        raise SpecError("--goal: one latency budget at a time")
    if using is None:
        using = ("prune", "codebook") if any(c.metric == "bytes" for c in constraints) else ("prune",)
    if using == ("codebook",) and all(c.metric != "bytes" for c in constraints):
        raise SpecError("--goal: codebook changes size only; a macs or latency goal needs using=prune or lowrank")
    return Goal(tuple(constraints), using, ",".join(parts), sensitivity)


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (a latency target may carry parameters: latency=2x@arm(cpu=a))."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _number(part: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SpecError(f"--goal {part!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise SpecError(f"--goal {part!r}: {value!r} is not a finite number")
    return number


def _ratio(part: str, value: str) -> float:
    number = _number(part, value.strip().lower().removesuffix("x").strip())
    if number <= 1:
        raise SpecError(f"--goal {part!r}: a ratio must be greater than 1 (e.g. 8x)")
    return number
