"""Compress to a goal: `--goal size=8x` / `bytes=200k` / `macs=0.5` / `latency=1.5x@cpu`, allocated per layer.

    search = goal.search(model, parse_goal("size=8x"), calib, shapes, seed=0, original=model, ...)
    calls = search.calls          # e.g. prune(ratio=0,keep=[...]), codebook(bits=8,layer_bits=[...])

1. **Tables** (`measure_tables`, cached on disk by model, calibration data, seed and target): for every prunable
   channel group, the output loss when that group alone keeps 75/50/25 % of its channels (compensated as the
   pass does: `prune.rank_channels(scope="sensitivity")`); for every weight layer, the output loss when that layer
   alone is clustered by `codebook` at 1..8 bits (compensated). Loss = KL divergence of the class scores (else
   relative squared error) on held-out calibration samples. Costs: packed bytes per parameter of each layer at
   each bit width from the real encoding (`squeeze.pack` on the clustered model), MACs per layer, and for a
   latency goal the measured latency of the model with one group cut, per group and level, on the goal's target.
2. **Allocation** (`solve`): a multiple-choice knapsack solved by Lagrangian relaxation. For a multiplier λ,
   coordinate descent picks each knob's choice to minimise Σ predicted loss + λ Σ cost/budget (costs are
   coupled: a layer's bytes depend on its bits and on the channels kept on both of its sides, so each move is
   priced on the whole model); λ is bisected to the smallest value whose plan meets every budget.
3. **Measure and correct** (`search`): the plan is applied by the real passes and measured (packed bytes, MACs,
   latency on the target, accuracy drop on the guard data). A budget the real model misses is tightened by the
   miss and re-solved; when the drop exceeds `max_drop`, the prune and codebook parts are measured alone and
   their predicted losses rescaled to what was measured before re-solving; if the goal still costs too much
   accuracy, the budget is relaxed by bisection towards the original and the closest point within `max_drop`
   is kept. Every measured point is in the report (the Pareto curve), with predicted vs measured loss.

Channel counts are rounded to the goal target's preferred multiple (SIMD width) for latency goals; size and MAC
goals keep single-channel resolution.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from . import metrics, pack, runtime, verify
from .context import Context
from .data import Dataset
from .errors import PassError, SpecError, SqueezeError
from .model import to_graph, to_model
from .registry import get_pass, get_target
from .spec import Call, bind

CACHE_VERSION = 2
PRUNE_LEVELS = (0.25, 0.5, 0.75)        #: fractions of a group removed in the sensitivity tables
LOWRANK_LEVELS = (0.75, 0.5, 0.375, 0.25)  #: kept rank (fraction of full rank) of a low-rank implant, per layer
CODEBOOK_BITS = (8, 6, 5, 4, 3, 2, 1)   #: index widths measured per layer (0 = left in float)
MAX_ROUNDS = 6                          #: measured plans per search (each applies the passes for real)
RELAX_STEPS = (0.96, 0.9, 0.8, 0.65, 0.5, 0.3)  #: how far towards the goal when it costs more than --max-drop
HOLDOUT_SAMPLES = 256                   #: calibration samples the tables come from (every 4th is held out)
METRICS = ("bytes", "macs", "latency")
NEEDS_CALIB = ("--goal needs --calib with real inputs: the sensitivities it allocates by are measured on "
               "calibration data")


# ------------------------------------------------------------------------------------------------ the goal


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
KNOBS = ("prune", "lowrank", "codebook")


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


# ---------------------------------------------------------------------------------------------- the tables


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
    input (output) channels. `bits`: packed bits per parameter when clustered at each index width (measured);
    `float_bits`: as stored now."""

    name: str
    params: int
    macs: int
    float_bits: float
    bits: dict[int, float] = field(default_factory=dict)
    ins: dict[str, float] = field(default_factory=dict)
    outs: dict[str, float] = field(default_factory=dict)


@dataclass
class Tables:
    knobs: list[Knob]
    layers: list[LayerCost]
    base: dict[str, float]       # the model the plan starts from: packed bytes, macs, latency (seconds)
    other: dict[str, float]      # what no knob changes: bytes and MACs outside the layers
    seconds: float = 0.0         # spent measuring (0 for parts read from the cache)
    cached: bool = False         # every part came from the cache


def cache_root() -> Path:
    """$SQUEEZE_CACHE, else ~/.cache/squeeze."""
    root = os.environ.get("SQUEEZE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "squeeze"


_CODE_VERSIONS: dict[tuple[str, ...], str] = {}


def code_version(packages: tuple[str, ...] = ("squeeze", "squeeze.passes")) -> str:
    """A digest of the source of what measures the tables: every module of the core and of the passes (the
    targets too for latency tables), and squeeze's version. An edit to any of them is a new version, so tables
    measured by other code are never read back."""
    if packages not in _CODE_VERSIONS:
        import importlib  # noqa: PLC0415
        import importlib.metadata  # noqa: PLC0415
        h = hashlib.sha256()
        try:
            h.update(importlib.metadata.version("squeeze").encode())
        except importlib.metadata.PackageNotFoundError:
            pass
        for name in packages:
            folder = Path(importlib.import_module(name).__file__).parent
            for f in sorted(folder.glob("*.py")):
                h.update(f"{name}/{f.name}".encode() + hashlib.sha256(f.read_bytes()).digest())
        _CODE_VERSIONS[packages] = h.hexdigest()[:16]
    return _CODE_VERSIONS[packages]


def _cache_path(model: onnx.ModelProto, calib: Dataset, seed: int, part: str, extra: list,
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


def _read_cache(path: Path, enabled: bool) -> dict | None:
    if not enabled or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return data if data.get("version") == CACHE_VERSION else None
    except (OSError, ValueError):
        return None  # a damaged cache file is measured again and replaced


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


def _holdout(calib: Dataset) -> Dataset:
    from squeeze.passes import compensate  # noqa: PLC0415
    data = calib.subset(0, min(len(calib), HOLDOUT_SAMPLES))
    n = len(data)
    every = compensate.HOLDOUT_EVERY
    held = np.arange(n) % every == every - 1 if n >= 2 * every else np.ones(n, bool)
    return Dataset({k: v[held] for k, v in data.arrays.items()}, None, data.source, dict(data.stacked))


def measure_tables(model: onnx.ModelProto, goal: Goal, calib: Dataset, shapes: dict[str, tuple[int, ...]], *,
                   seed: int, threads: int | None, say: Callable[[str], None], target_latency=None,
                   latency_key: str | None = None, multiple: int = 1, cache: bool = True) -> Tables:
    """Sensitivity and cost tables of `model` (see the module docstring); each part from the cache when there."""
    from squeeze.passes import lowrank as lowrank_mod  # noqa: PLC0415
    from squeeze.passes import prune as prune_mod  # noqa: PLC0415
    from squeeze.passes.channel_plan import note_unprunable  # noqa: PLC0415
    from squeeze.passes.coupling import channel_groups  # noqa: PLC0415
    from squeeze.passes.cutting import apply_plan  # noqa: PLC0415
    from squeeze.passes.weights import find_layers  # noqa: PLC0415

    start = time.perf_counter()
    graph = to_graph(model)
    groups = channel_groups(graph, shapes)
    ctx = Context(calib=calib, seed=seed, model=model, input_shapes=shapes, threads=threads)
    note_unprunable(ctx, groups)
    candidates = prune_mod.candidate_groups(groups, ctx, multiple) if "prune" in goal.using else []
    implants = lowrank_mod.candidate_layers(graph, ctx) if "lowrank" in goal.using else []
    layers = [l for l in find_layers(graph) if l.values is not None and l.values.size >= 2
              and np.isfinite(l.values).all()]
    layer_names = sorted(l.name for l in layers)

    stats = metrics.summary(model, shapes)
    size = pack.size_report(model)
    costs: dict[str, LayerCost] = {}
    for l in layers:
        costs[l.name] = LayerCost(l.name, int(l.values.size), int(stats["macs_per_node"].get(l.name, 0)),
                                  float(size["bits_per_param"]["layers"].get(l.name, 32.0)))
    for g in candidates:
        for m in g.members:
            if m.node.name not in costs or not m.slot.width:
                continue
            share = m.slot.length / (g.size * m.slot.width)
            if m.port in ("out", "dw"):
                costs[m.node.name].outs[g.name] = costs[m.node.name].outs.get(g.name, 0.0) + share
            if m.port == "in":
                costs[m.node.name].ins[g.name] = costs[m.node.name].ins.get(g.name, 0.0) + share
    base = {"bytes": float(size["packed"]), "macs": float(stats["macs"]), "latency": 0.0}

    # the channel order prune(keep=...) will cut in: the pass's default criterion, ranked the same way here
    criterion = get_pass("prune").bind({})["criterion"]
    prune_path = _cache_path(model, calib, seed, "prune", [multiple, list(PRUNE_LEVELS), criterion], latency_key)
    book_path = _cache_path(model, calib, seed, "codebook" if goal.sensitivity == "measured" else "codebook-hessian",
                            [list(CODEBOOK_BITS), layer_names])
    lowrank_path = _cache_path(model, calib, seed, "lowrank", [list(LOWRANK_LEVELS), implants], latency_key)
    prune_part = _read_cache(prune_path, cache) if candidates else {"knobs": [], "latency": 0.0}
    book_part = _read_cache(book_path, cache) if "codebook" in goal.using else {"knobs": [], "bits": {}}
    lowrank_part = _read_cache(lowrank_path, cache) if implants else {"knobs": [], "latency": 0.0}
    steps = (0 if prune_part else len(candidates) * len(PRUNE_LEVELS) * (2 if target_latency else 1)
             + (1 if target_latency else 0)) + (0 if book_part else len(CODEBOOK_BITS) * (
                 (len(layers) if goal.sensitivity == "measured" else 0) + 1) + (goal.sensitivity != "measured")) \
        + (0 if lowrank_part else len(implants) * len(LOWRANK_LEVELS) + (1 if target_latency else 0))
    bar = Progress(say, steps, "measuring sensitivity")
    if steps:
        holdout = _holdout(calib)
        reference = runtime.run(model, holdout, threads=threads)

    if prune_part is None:
        prune_part = {"version": CACHE_VERSION, "knobs": [], "latency": 0.0}
        ranking = prune_mod.rank_channels(candidates, ctx, criterion=criterion, scope="layer", multiple=multiple,
                                          compensate=True)
        for g in ranking.groups:  # prune's own sensitivity curves, one group at a time for the bar
            curves: dict = {}
            prune_mod.sensitivity_scores(ctx, [g], ranking.scores, multiple, True, curves)
            for _ in PRUNE_LEVELS:
                bar.step(f"prune {g.name}")
            points = curves.get(g, [(0, 0.0)])
            knob = Knob("prune", g.name, [g.size - k for k, _ in points], [float(v) for _, v in points], size=g.size)
            if target_latency is not None:
                if not prune_part["latency"]:
                    prune_part["latency"] = target_latency(model)
                    bar.step("latency of the starting model")
                saved = [0.0]
                order = np.argsort(-np.asarray(ranking.scores[g], dtype=np.float64), kind="stable")
                for kept in knob.choices[1:]:
                    g2 = to_graph(model)  # weights do not change the timing: cut, no compensation
                    twin = next(t for t in channel_groups(g2, shapes) if t.prunable and t.name == g.name)
                    apply_plan(g2, {twin: np.sort(order[:kept])})
                    saved.append(max(0.0, prune_part["latency"] - target_latency(to_model(g2, like=model))))
                    bar.step(f"latency {g.name} keeps {kept}/{g.size}")
                knob.latency_saved = [float(v) for v in np.maximum.accumulate(saved)]
            prune_part["knobs"].append(asdict(knob))
        if cache:
            _write_cache(prune_path, prune_part)

    if book_part is None:
        book_part = {"version": CACHE_VERSION, "knobs": [], "bits": {}}
        entry = get_pass("codebook")
        for bits in CODEBOOK_BITS:  # bytes from the real encoding: every layer clustered, then packed
            g2 = to_graph(model)
            c2 = Context(calib=calib, seed=seed, model=model, input_shapes=shapes, threads=threads)
            entry.obj(g2, c2, **entry.bind({"bits": bits, "compensate": False}))
            per_layer = pack.size_report(to_model(g2, like=model))["bits_per_param"]["layers"]
            for name in layer_names:
                book_part["bits"].setdefault(name, {})[str(bits)] = float(per_layer.get(name, costs[name].float_bits))
            bar.step(f"packed size of every layer at {bits} bits")
        if goal.sensitivity == "hessian":  # HAWQ-V2 proxy: ½·Tr(H)/n·‖Q(W)−W‖² (plain k-means, not compensated)
            from squeeze.passes import hessian  # noqa: PLC0415
            proxy = hessian.codebook_proxy(model, holdout, CODEBOOK_BITS, seed=seed, threads=threads)
            bar.step("Hessian traces")
            for name in layer_names:
                if name in proxy:
                    book_part["knobs"].append(asdict(Knob("codebook", name, [0, *CODEBOOK_BITS],
                                                          [float(v) for v in proxy[name]])))
        for name in (layer_names if goal.sensitivity == "measured" else []):
            # loss: this layer alone clustered (compensated as the pass does)
            loss = [0.0]
            for bits in CODEBOOK_BITS:
                g2 = to_graph(model)
                c2 = Context(calib=calib, seed=seed, model=model, input_shapes=shapes, threads=threads)
                entry.obj(g2, c2, **entry.bind({"bits": bits, "skip": [n for n in layer_names if n != name]}))
                out = runtime.run(to_model(g2, like=model), holdout, threads=threads)
                loss.append(verify.output_loss(reference, out))
                bar.step(f"codebook {name} at {bits} bits")
            book_part["knobs"].append(asdict(Knob("codebook", name, [0, *CODEBOOK_BITS], loss)))
        if cache:
            _write_cache(book_path, book_part)

    if lowrank_part is None:
        lowrank_part = {"version": CACHE_VERSION, "knobs": [], "latency": 0.0}
        entry = get_pass("lowrank")
        base_params = metrics.count_params(model)
        if target_latency is not None:
            lowrank_part["latency"] = prune_part["latency"] or target_latency(model)
            bar.step("latency of the starting model")
        for name in implants:  # this layer alone factorized at each rank (fitted and refit as the pass does)
            others = [n for n in implants if n != name]
            knob = Knob("lowrank", name, [0.0], [0.0], latency_saved=[0.0] if target_latency else None,
                        macs_kept=[1.0], params_kept=[1.0])
            for level in LOWRANK_LEVELS:
                g2 = to_graph(model)
                c2 = Context(calib=calib, seed=seed, model=model, input_shapes=shapes, threads=threads)
                entry.obj(g2, c2, **entry.bind({"layer_rank": [f"{name}={level}"], "skip": others}))
                bar.step(f"lowrank {name} at rank {level:g}")
                if not c2.details.get("layers"):
                    continue  # not factorized at this rank (no fewer MACs than the layer): no choice
                factored = to_model(g2, like=model)
                per_node = metrics.summary(factored, shapes)["macs_per_node"]
                knob.choices.append(float(level))
                knob.loss.append(verify.output_loss(reference, runtime.run(factored, holdout, threads=threads)))
                knob.macs_kept.append((per_node.get(name, 0) + per_node.get(f"{name}_lowrank", 0))
                                      / max(costs[name].macs, 1))
                knob.params_kept.append(1.0 - (base_params - metrics.count_params(factored)) / costs[name].params)
                if target_latency is not None:
                    knob.latency_saved.append(max(knob.latency_saved[-1],
                                                  lowrank_part["latency"] - target_latency(factored)))
            if len(knob.choices) > 1:
                lowrank_part["knobs"].append(asdict(knob))
        if cache:
            _write_cache(lowrank_path, lowrank_part)

    for name, per_bits in book_part["bits"].items():
        if name in costs:
            costs[name].bits = {int(b): v for b, v in per_bits.items()}
    base["latency"] = float(prune_part["latency"] or lowrank_part["latency"])
    knobs = [Knob(**k) for k in prune_part["knobs"] + lowrank_part["knobs"] + book_part["knobs"]]
    layer_bytes = sum(c.params * c.float_bits / 8 for c in costs.values())
    layer_macs = sum(c.macs for c in costs.values())
    other = {"bytes": max(0.0, base["bytes"] - layer_bytes), "macs": max(0.0, base["macs"] - layer_macs)}
    return Tables(knobs, list(costs.values()), base, other, round(time.perf_counter() - start, 2), cached=not steps)


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".goal-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next run the measurement


# ---------------------------------------------------------------------------------------------- allocation


Plan = dict[str, int]   # knob key ("prune:NAME" / "codebook:NAME") → choice index


def knob_key(knob: Knob) -> str:
    return f"{knob.kind}:{knob.name}"


class Model:
    """Predicted loss and costs of a plan, from the tables."""

    def __init__(self, tables: Tables, scale: dict[str, float] | None = None,
                 cost_scale: dict[str, float] | None = None):
        self.t = tables
        self.scale = dict(scale or {kind: 1.0 for kind in KNOBS})          # measured / predicted loss
        self.cost_scale = dict(cost_scale or {m: 1.0 for m in METRICS})   # measured / predicted cost
        self.by_key = {knob_key(k): k for k in tables.knobs}
        self.groups = {k.name: k for k in tables.knobs if k.kind == "prune"}

    def loss(self, plan: Plan) -> float:
        return sum(self.scale[k.kind] * k.loss[plan.get(key, 0)] for key, k in self.by_key.items())

    def kept(self, plan: Plan) -> dict[str, int]:
        """Channels removed per group."""
        return {name: k.size - k.choices[plan.get(f"prune:{name}", 0)] for name, k in self.groups.items()}

    def costs(self, plan: Plan) -> dict[str, float]:
        removed = self.kept(plan)
        total_bytes, total_macs = self.t.other["bytes"], self.t.other["macs"]
        for c in self.t.layers:
            fin = max(0.0, 1.0 - sum(removed.get(g, 0) * s for g, s in c.ins.items()))
            fout = max(0.0, 1.0 - sum(removed.get(g, 0) * s for g, s in c.outs.items()))
            knob = self.by_key.get(f"codebook:{c.name}")
            bits = knob.choices[plan.get(f"codebook:{c.name}", 0)] if knob else 0
            bpp = c.bits.get(bits, c.float_bits) if bits else c.float_bits
            implant = self.by_key.get(f"lowrank:{c.name}")
            i = plan.get(f"lowrank:{c.name}", 0) if implant else 0
            # an implant on a pruned layer: its measured fractions, scaled by the channels pruning leaves
            total_bytes += c.params * fin * fout * bpp / 8 * (implant.params_kept[i] if i else 1.0)
            total_macs += c.macs * fin * fout * (implant.macs_kept[i] if i else 1.0)
        saved = sum(k.latency_saved[plan.get(key, 0)] for key, k in self.by_key.items() if k.latency_saved)
        latency = max(self.t.base["latency"] - saved, 1e-3 * self.t.base["latency"])
        raw = {"bytes": total_bytes, "macs": total_macs, "latency": latency}
        return {m: v * self.cost_scale[m] for m, v in raw.items()}


def feasible(costs: dict[str, float], budgets: dict[str, float]) -> bool:
    return all(costs[m] <= b * (1 + 1e-9) for m, b in budgets.items())


def solve(model: Model, budgets: dict[str, float], sweeps: int = 12, exchange: bool = True
          ) -> tuple[Plan, dict[str, float], float]:
    """The plan of least predicted loss that meets `budgets` (or the cheapest one found): Lagrangian relaxation
    with coordinate descent over the coupled costs, λ bisected on a log scale."""
    keys = list(model.by_key)

    def objective(plan: Plan, lam: float) -> float:
        c = model.costs(plan)
        return model.loss(plan) + lam * sum(c[m] / b for m, b in budgets.items())

    def descend(lam: float, start: Plan) -> Plan:
        plan = dict(start)
        for _ in range(sweeps):
            changed = False
            for key in keys:
                best, best_value = plan.get(key, 0), None
                for i in range(len(model.by_key[key].choices)):
                    value = objective({**plan, key: i}, lam)
                    if best_value is None or value < best_value - 1e-15:
                        best, best_value = i, value
                if best != plan.get(key, 0):
                    plan[key] = best
                    changed = True
            if not changed:
                break
        return plan

    strongest = {k: len(model.by_key[k].choices) - 1 for k in keys}
    lo, hi = -12.0, 6.0   # log10 λ
    best_plan = descend(10 ** hi, strongest)
    if not feasible(model.costs(best_plan), budgets):
        best_plan = _strengthen(model, best_plan, budgets)
        return best_plan, model.costs(best_plan), model.loss(best_plan)
    below: Plan | None = None
    for _ in range(30):
        mid = (lo + hi) / 2
        plans = [descend(10 ** mid, {}), descend(10 ** mid, best_plan)]
        ok = [p for p in plans if feasible(model.costs(p), budgets)]
        if ok:
            hi = mid
            candidate = min(ok, key=model.loss)
            if model.loss(candidate) <= model.loss(best_plan):
                best_plan = candidate
        else:
            lo = mid
            below = min(plans, key=lambda p: _violation(model.costs(p), budgets))
        if hi - lo < 0.02:
            break
    # λ only reaches the plans on the convex hull of (cost, loss); between two hull plans a greedy pass does
    # better: weaken the feasible plan while it stays feasible, and strengthen the infeasible one until it fits.
    candidates = [_weaken(model, best_plan, budgets)]
    if below is not None:
        candidates.append(_weaken(model, _strengthen(model, below, budgets), budgets))
    ok = [p for p in candidates if feasible(model.costs(p), budgets)]
    best_plan = min(ok or [best_plan], key=model.loss)
    if exchange:
        best_plan = _exchange(model, best_plan, budgets)
    return best_plan, model.costs(best_plan), model.loss(best_plan)


def _exchange(model: Model, plan: Plan, budgets: dict[str, float], rounds: int = 4) -> Plan:
    """Pairwise exchange: weaken one knob and strengthen another when the pair stays within budget and lowers
    the predicted loss (what single-knob moves cannot reach between two hull plans)."""
    keys = list(model.by_key)
    for _ in range(rounds):
        base_loss, best, best_loss = model.loss(plan), None, None
        for a in keys:
            for i in range(plan.get(a, 0)):                       # a: one step or more weaker
                weaker = {**plan, a: i}
                gain = base_loss - model.loss(weaker)
                if gain <= 1e-15:
                    continue
                for b in keys:
                    if b == a:
                        continue
                    for j in range(plan.get(b, 0) + 1, len(model.by_key[b].choices)):  # b: stronger
                        trial = {**weaker, b: j}
                        loss = model.loss(trial)
                        if loss < base_loss - 1e-15 and (best_loss is None or loss < best_loss) \
                                and feasible(model.costs(trial), budgets):
                            best, best_loss = trial, loss
        if best is None:
            return plan
        plan = _weaken(model, best, budgets)
    return plan


def _violation(costs: dict[str, float], budgets: dict[str, float]) -> float:
    return sum(max(0.0, costs[m] / b - 1.0) for m, b in budgets.items())


def _strengthen(model: Model, plan: Plan, budgets: dict[str, float]) -> Plan:
    """Greedy: the move that removes the most budget violation per unit of added loss, until feasible."""
    plan = dict(plan)
    while True:
        violation = _violation(model.costs(plan), budgets)
        if violation <= 1e-12:
            return plan
        best, best_rate = None, None
        base_loss = model.loss(plan)
        for key, knob in model.by_key.items():
            for i in range(plan.get(key, 0) + 1, len(knob.choices)):
                trial = {**plan, key: i}
                gain = violation - _violation(model.costs(trial), budgets)
                if gain <= 1e-15:
                    continue
                rate = max(model.loss(trial) - base_loss, 0.0) / gain
                if best_rate is None or rate < best_rate:
                    best, best_rate = trial, rate
        if best is None:
            return plan
        plan = best


def _weaken(model: Model, plan: Plan, budgets: dict[str, float]) -> Plan:
    """Greedy: while some knob can step back towards less compression and stay within budget, take the step
    that lowers the predicted loss most."""
    plan = dict(plan)
    while True:
        base_loss = model.loss(plan)
        best, best_loss = None, base_loss
        for key in model.by_key:
            for i in range(plan.get(key, 0)):
                trial = {**plan, key: i}
                loss = model.loss(trial)
                if loss < best_loss - 1e-15 and feasible(model.costs(trial), budgets):
                    best, best_loss = trial, loss
        if best is None:
            return plan
        plan = best


def predicted_curve(model: Model, metric: str, up_to: float, points: int = 20) -> list[dict]:
    """The predicted frontier: least predicted loss at ratios from 1 to `up_to` (or the strongest plan)."""
    base = model.costs({})[metric]
    floor = model.costs({k: len(model.by_key[k].choices) - 1 for k in model.by_key})[metric]
    out = []
    for r in np.geomspace(1.0, max(min(base / max(floor, 1e-12), up_to), 1.0), points)[1:]:
        plan, costs, loss = solve(model, {metric: base / r}, sweeps=6, exchange=False)
        if feasible(costs, {metric: base / r}):
            out.append({"ratio": round(float(base / costs[metric]), 4), "loss": round(float(loss), 6)})
    return out


# ------------------------------------------------------------------------------------------------ the plan


def plan_calls(model: Model, plan: Plan) -> list[Call]:
    """The plan as ordinary pass calls (what the report shows and a user can rerun with --passes)."""
    calls = []
    keep = [f"{name}={k.choices[plan.get(f'prune:{name}', 0)]}" for name, k in model.groups.items()
            if plan.get(f"prune:{name}", 0)]
    if keep:
        calls.append(f"prune(ratio=0,keep={_list(keep)})")
    implants = {k.name: k.choices[plan.get(key, 0)] for key, k in model.by_key.items() if k.kind == "lowrank"}
    ranks = [f"{n}={r:g}" for n, r in implants.items() if r]
    if ranks:
        others = [n for n, r in implants.items() if not r]
        calls.append(f"lowrank(layer_rank={_list(ranks)}" + (f",skip={_list(others)})" if others else ")"))
    bits = {k.name: int(k.choices[plan.get(key, 0)]) for key, k in model.by_key.items() if k.kind == "codebook"}
    for n, r in implants.items():  # an implant's first factor is clustered like the layer (its second factor)
        if r and n in bits:
            bits[f"{n}_lowrank"] = bits[n]
    clustered = {n: b for n, b in bits.items() if b}
    if clustered:
        common = max(set(clustered.values()), key=lambda b: (list(clustered.values()).count(b), b))
        spec = f"codebook(bits={common}"
        per = [f"{n}={b}" for n, b in clustered.items() if b != common]
        floats = [n for n, b in bits.items() if not b]
        if per:
            spec += f",layer_bits={_list(per)}"
        if floats:
            spec += f",skip={_list(floats)}"
        calls.append(spec + ")")
    return [c for spec in calls for c in bind(spec, get_pass)]


def _list(items: list[str]) -> str:
    for item in items:
        if "'" in item or "\\" in item:
            raise PassError(f"--goal cannot name {item!r} in a pass spec (a quote or backslash in a node name)")
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def describe_plan(model: Model, plan: Plan) -> list[dict]:
    rows = []
    for key, k in model.by_key.items():
        i = plan.get(key, 0)
        row = {"kind": k.kind, "name": k.name, "predicted_loss": round(float(k.loss[i]), 6)}
        if k.kind == "prune":
            row.update(channels_before=k.size, channels_after=k.choices[i])
        elif k.kind == "lowrank":
            row.update(rank=k.choices[i] or "full", macs_kept=round(float(k.macs_kept[i]), 4))
        else:
            row["bits"] = k.choices[i] or "float"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    calls: list[Call]
    report: dict[str, Any]


def search(model: onnx.ModelProto, goal: Goal, calib: Dataset, shapes: dict[str, tuple[int, ...]], *,
           original: onnx.ModelProto, seed: int = 0, threads: int | None = None, max_drop: float | None = None,
           guard_data: Dataset | None = None, say: Callable[[str], None] = lambda m: None,
           runner=None, cache: bool = True, metric=None) -> SearchResult:
    """Allocate per-layer strengths for `goal` on `model` (the input after any --passes), measure, correct.

    The drop held within `max_drop` is `metric`'s (a squeeze.task_metrics.Metric; default top-1 with labels,
    else agreement) on `guard_data`: validation data, never the evaluation data (squeeze.api passes --val or the
    held-out part of --calib; `calib` is then the part the passes fit on). Without it, `calib` itself.
    """
    from .guard import Guard  # noqa: PLC0415
    from .pipeline import apply_pass  # noqa: PLC0415

    if calib.source.startswith("synthetic"):
        raise SqueezeError(NEEDS_CALIB)
    started = time.perf_counter()
    latency_fn, multiple, target_name, device = None, 1, None, None
    if goal.latency is not None:
        latency_fn, multiple, target_name, device = _latency_meter(goal.latency.target, shapes, calib, threads,
                                                                   runner)
    tables = measure_tables(model, goal, calib, shapes, seed=seed, threads=threads, say=say, target_latency=latency_fn,
                            latency_key=f"{target_name}-t{threads} {device}" if latency_fn else None,
                            multiple=multiple, cache=cache)
    if not tables.knobs:
        raise SqueezeError(f"--goal {goal.text}: nothing to allocate ({'+'.join(goal.using)} finds no prunable "
                           "channel group or clusterable weight in this model)")
    original_costs = {"bytes": float(pack.size_report(original)["packed"]),
                      "macs": float(metrics.summary(original, shapes)["macs"]),
                      "latency": latency_fn(original) if latency_fn else 0.0}
    budgets: dict[str, float] = {}
    for c in goal.constraints:  # two budgets on one metric (size=8x,bytes=100k): the tighter one holds
        budgets[c.metric] = min(budgets.get(c.metric, math.inf), c.limit(original_costs[c.metric]))
    guard = Guard(original, max_drop if max_drop is not None else float("inf"), guard_data or calib, calib, threads,
                  metric)
    show = guard.metric.show_drop
    holdout = _holdout(calib)
    reference = runtime.run(model, holdout, threads=threads)
    predictor = Model(tables)
    points: list[dict] = []
    parts: list[dict] = []   # the prune / codebook halves of a plan measured alone (loss rescaling)

    def measure(plan: Plan, label: str, only: str | None = None) -> dict:
        calls = plan_calls(predictor, {k: v for k, v in plan.items() if only is None or k.startswith(only)})
        current = model
        for call in calls:
            current, _ = apply_pass(call, call.params, current, calib, shapes, seed, threads)
        out = runtime.run(current, holdout, threads=threads)
        point = {"label": label, "spec": ",".join(str(c) for c in calls),
                 "predicted_loss": round(Model(tables, predictor.scale).loss(
                     {k: v for k, v in plan.items() if only is None or k.startswith(only)}), 6),
                 "measured_loss": round(verify.output_loss(reference, out), 6)}
        if only is None:
            point["bytes"] = int(pack.size_report(current)["packed"])
            point["macs"] = int(metrics.summary(current, shapes)["macs"])
            if latency_fn:
                point["latency_ms"] = round(1e3 * latency_fn(current), 4)
            point["drop"] = round(guard.drop(current), 4)
            point["ratios"] = _ratios(point, original_costs)
            point["meets_goal"] = bool(all(_measured(point, m) <= b * (1 + 1e-9) for m, b in budgets.items()))
            point["within_max_drop"] = max_drop is None or point["drop"] <= max_drop
            points.append(point)
        return point

    say(f"goal: allocating for {goal.text} (budgets: {_show_budgets(budgets, original_costs)})")
    measured: dict[tuple, dict] = {}
    chosen: tuple[Plan, dict] | None = None
    history: list[str] = []
    rescaled = False
    for rounds in range(1, MAX_ROUNDS + 1):
        plan, predicted, loss = solve(predictor, budgets)
        key = _plan_key(plan)
        if key in measured:
            history.append(f"round {rounds}: the corrected tables choose a plan already measured; stopping")
            break
        if not feasible(predicted, budgets):
            history.append(f"round {rounds}: no plan in the tables meets the budgets (strongest predicted: "
                           f"{_show_costs(predicted, original_costs)})")
        say(f"goal: round {rounds}: applying the plan (predicted loss {loss:.4g})")
        point = measure(plan, f"round {rounds}")
        point["predicted"] = _ratios({"bytes": predicted["bytes"], "macs": predicted["macs"],
                                      "latency_ms": 1e3 * predicted["latency"]}, original_costs)
        measured[key] = point
        missed = {m: _measured(point, m) / b for m, b in budgets.items() if _measured(point, m) > b * (1 + 1e-9)}
        if missed:
            if not feasible(predicted, budgets):
                history.append(f"round {rounds}: missed {_show_missed(missed)}; the tables hold no stronger plan")
                break
            for m in budgets:  # re-solve with the cost the real model showed
                predictor.cost_scale[m] *= _measured(point, m) / max(predicted[m], 1e-30)
            history.append(f"round {rounds}: measured {_show_missed(missed)} over budget; cost model corrected "
                           "by the measurement and re-solved")
            continue
        if point["within_max_drop"]:
            chosen = (plan, point)
            history.append(f"round {rounds}: meets the goal, drop {show(point['drop'])}")
            break
        if not rescaled and max_drop is not None:
            rescaled = True
            for kind in KNOBS:
                sub = {k: v for k, v in plan.items() if k.startswith(kind) and v}
                if sub and any(not k.startswith(kind) and v for k, v in plan.items()):
                    p = measure(sub, f"round {rounds}: {kind} part alone", only=kind)
                    parts.append(p)
                    if p["predicted_loss"] > 0:
                        predictor.scale[kind] *= max(p["measured_loss"], 1e-9) / p["predicted_loss"]
            if parts:
                history.append(f"round {rounds}: drop {show(point['drop'])} > {show(max_drop)}; predicted losses "
                               "rescaled by the parts measured alone (" + ", ".join(
                                   f"{kind} ×{predictor.scale[kind]:.3g}" for kind in KNOBS if kind in goal.using)
                               + ") and re-solved")
                continue
        history.append(f"round {rounds}: the goal costs {show(point['drop'])} > {show(max_drop)}; relaxing the budget")
        break

    if chosen is not None and "lowrank" in goal.using:
        chosen = _uniform_implants(predictor, budgets, chosen, measure, measured, history)
    status = "met"
    if chosen is None:
        chosen = _relax(predictor, budgets, measure, measured, max_drop, history, say, show)
        status = "closest"
    plan, point = chosen if chosen else ({}, None)
    report = {
        "goal": goal.text, "using": list(goal.using), "sensitivity": goal.sensitivity, "max_drop": max_drop,
        "budgets": {m: _budget_view(m, b, original_costs) for m, b in budgets.items()},
        "latency_target": target_name, "channel_multiple": multiple,
        "status": status if point else "unreachable",
        "why": history,
        "plan": describe_plan(predictor, plan),
        "spec": point["spec"] if point else "",
        "predicted_loss": point["predicted_loss"] if point else None,
        "measured_loss": point["measured_loss"] if point else None,
        "points": points,
        "parts": parts,
        "predicted_curve": {m: predicted_curve(predictor, m, 2.5 * original_costs[m] / b)
                            for m, b in budgets.items()},
        "tables": {"seconds": tables.seconds, "cached": tables.cached, "knobs": len(tables.knobs),
                   "holdout_samples": len(holdout)},
        "loss_scale": predictor.scale,
        "drop_basis": "validation: " + guard.basis + f" on {guard.data.source}",
        "metric": guard.metric.spec,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if point is None:
        report["why"].append("no measured plan stays within --max-drop; nothing is compressed")
        return SearchResult([], report)
    return SearchResult(plan_calls(predictor, plan), report)


def _uniform_implants(predictor: Model, budgets, chosen: tuple[Plan, dict], measure, measured: dict, history):
    """The same rank for every implant (the weakest of LOWRANK_LEVELS whose predicted costs meet the budgets),
    measured next to the allocated plan; the one with the lower measured loss on the held-out calibration samples
    is kept. The tables measure each layer factorized alone, but the pass refits every layer on the output of
    those factorized before it, so losses do not add up and a uniform plan can beat the allocation (issue 21:
    sri_resnet_a, macs=0.65: allocated 4.3 pts lost on unseen images, uniform rank 0.5 2.6)."""
    implants = [k for k in predictor.by_key.values() if k.kind == "lowrank"]
    for level in LOWRANK_LEVELS:
        plan = {knob_key(k): k.choices.index(level) for k in implants if level in k.choices}
        if plan and feasible(predictor.costs(plan), budgets):
            break
    else:
        return chosen
    key = _plan_key(plan)
    if key not in measured:
        measured[key] = measure(plan, f"uniform rank {level:g}")
    point = measured[key]
    if point["meets_goal"] and point["within_max_drop"] and point["measured_loss"] < chosen[1]["measured_loss"]:
        history.append(f"every implant at rank {level:g}: measured loss {point['measured_loss']:.4g} < "
                       f"{chosen[1]['measured_loss']:.4g} of the allocated plan; kept")
        return plan, point
    history.append(f"every implant at rank {level:g}: measured loss {point['measured_loss']:.4g}, not below "
                   f"{chosen[1]['measured_loss']:.4g} of the allocated plan (or over budget)")
    return chosen


def _relax(predictor: Model, budgets, measure, measured: dict, max_drop, history, say,
           show: Callable[[float], str] = lambda drop: f"{drop:.2f} pts"):
    """Back off from the goal towards the original (each budget on a log scale) until a plan stays within
    max_drop; the most compressed such plan, or None."""
    base = {m: v / predictor.cost_scale[m] for m, v in predictor.costs({}).items()}
    for way in RELAX_STEPS:
        plan, _, _ = solve(predictor, {m: base[m] * (b / base[m]) ** way for m, b in budgets.items()})
        key = _plan_key(plan)
        if key not in measured:
            say(f"goal: relaxing to {way:.0%} of the way to the goal")
            measured[key] = measure(plan, f"relax {way:.0%}")
        point = measured[key]
        if point["within_max_drop"]:
            history.append(f"closest point within --max-drop {max_drop}: {_show_ratios(point['ratios'])} "
                           f"(bytes, MACs smaller; latency faster), drop {show(point['drop'])}")
            return plan, point
    return None


def _plan_key(plan: Plan) -> tuple:
    return tuple(sorted((k, v) for k, v in plan.items() if v))


def _strength(point: dict, budgets: dict) -> float:
    return min(point["ratios"].get(m, 1.0) for m in budgets)


def _measured(point: dict, metric: str) -> float:
    return point["latency_ms"] / 1e3 if metric == "latency" else point[metric]


def _ratios(point: dict, original: dict) -> dict[str, float]:
    out = {"bytes": round(original["bytes"] / max(point["bytes"], 1), 4),
           "macs": round(original["macs"] / max(point["macs"], 1), 4)}
    if point.get("latency_ms") and original.get("latency"):
        out["latency"] = round(1e3 * original["latency"] / point["latency_ms"], 4)
    return out


def _budget_view(metric: str, budget: float, original: dict) -> dict:
    view = {"limit": round(budget, 6) if metric == "latency" else int(budget),
            "original": round(original[metric], 6) if metric == "latency" else int(original[metric]),
            "ratio": round(original[metric] / budget, 4) if budget else None}
    if metric == "latency":
        view["unit"] = "seconds"
    return view


def _show_budgets(budgets: dict, original: dict) -> str:
    return ", ".join(f"{m} ≤ {original[m] / b:.3g}× smaller" if m != "latency" else f"latency {original[m] / b:.3g}× "
                     "faster" for m, b in budgets.items())


def _show_costs(costs: dict, original: dict) -> str:
    return ", ".join(f"{m} {original[m] / max(costs[m], 1e-12):.3g}×" for m in ("bytes", "macs") if original[m])


def _show_missed(missed: dict) -> str:
    return ", ".join(f"{m} by {100 * (v - 1):.1f} %" for m, v in missed.items())


def _show_ratios(ratios: dict) -> str:
    return ", ".join(f"{m} {v:g}×" for m, v in ratios.items())


def _latency_meter(spec: str, shapes, calib: Dataset, threads, runner):
    """A function model → seconds (p50) on the goal's target, its preferred channel multiple and its spec."""
    calls = bind(spec, get_target)
    if len(calls) != 1:
        raise SpecError(f"--goal latency=…@{spec}: name one target")
    call = calls[0]
    target = call.entry.obj(**call.params)
    target.runner = runner
    missing = target.missing()
    if missing:
        raise SqueezeError(f"--goal latency=…@{call.name}: {missing}")
    from squeeze.targets import tvm_build  # noqa: PLC0415
    tvm_build.set_threads(threads)
    samples = calib.samples(1)

    def latency(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="squeeze-goal-") as scratch:  # build files live only to be timed
            measured = target.measure(target.build(model, shapes, Path(scratch)), samples, 30)
        if not measured.latency_ms:
            raise SqueezeError(f"--goal latency=…@{call.name}: this target gives no latency "
                               f"(method {measured.method}); name a target that times the model")
        return measured.latency_ms["p50"] / 1e3

    return latency, int(getattr(target, "channel_multiple", 1) or 1), str(call), device_identity(runner)


def device_identity(runner) -> str:
    """Where latency is measured: the RPC device (`key-KEY` / `rpc-HOST-PORT`), else this host's CPU model."""
    if runner is not None and hasattr(runner, "identity"):
        return f"device={runner.identity()}"
    from squeeze.targets.tuning import host_model  # noqa: PLC0415
    return f"host={host_model()}"
