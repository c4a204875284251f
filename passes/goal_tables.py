"""The sensitivity and cost tables `--goal` allocates by (squeeze.goal), measured by running the passes: the hook
"goal-tables".

For every prunable channel group, the output loss when that group alone keeps 75/50/25 % of its channels
(compensated as the pass does: `prune.rank_channels` and `prune.sensitivity_scores`); for every weight layer, the
output loss when that layer alone is clustered by `codebook` at 1..8 bits (compensated), or the Hessian proxy of
it (`sensitivity=hessian`, passes/hessian.py); for every low-rank candidate, the loss of that layer alone
factorized at each rank. Loss = KL divergence of the class scores (else relative squared error) on held-out
calibration samples (`squeeze.goal.table_samples`). Costs: packed bytes per parameter of each layer at each bit
width from the real encoding (`squeeze.pack` on the clustered model), MACs per layer, and for a latency goal the
measured latency of the model with one group cut (one layer factorized), per group and level, on the goal's
target. Each part (prune, codebook, lowrank) is cached on disk (squeeze.goal.tables).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx

from squeeze import metrics, pack, runtime, verify
from squeeze.context import Context
from squeeze.data import Dataset
from squeeze.goal.spec import Goal
from squeeze.goal.tables import (CACHE_VERSION, CODEBOOK_BITS, LOWRANK_LEVELS, PRUNE_LEVELS, Knob, LayerCost, Progress,
                                 Tables, cache_path, read_cache, table_samples, write_cache)
from squeeze.model import to_graph, to_model
from squeeze.registry import get_pass, provides

from . import lowrank as lowrank_mod
from . import prune as prune_mod
from .channel_plan import note_unprunable
from .coupling import channel_groups
from .cutting import apply_plan
from .weights import find_layers


@dataclass
class _Job:
    """What every part's measurement shares."""

    model: onnx.ModelProto
    calib: Dataset
    shapes: dict[str, tuple[int, ...]]
    seed: int
    threads: int | None
    ctx: Context
    bar: Progress | None = None
    holdout: Dataset | None = None
    reference: list | None = None
    target_latency: Callable[[onnx.ModelProto], float] | None = None

    def context(self) -> Context:
        """A fresh context for one pass run on a copy of the model."""
        return Context(calib=self.calib, seed=self.seed, model=self.model, input_shapes=self.shapes,
                       threads=self.threads)

    def loss(self, model: onnx.ModelProto) -> float:
        return verify.output_loss(self.reference, runtime.run(model, self.holdout, threads=self.threads))


@provides("goal-tables")
def measure_tables(model: onnx.ModelProto, goal: Goal, calib: Dataset, shapes: dict[str, tuple[int, ...]], *,
                   seed: int, threads: int | None, say: Callable[[str], None], target_latency=None,
                   latency_key: str | None = None, multiple: int = 1, cache: bool = True) -> Tables:
    """Sensitivity and cost tables of `model` (see the module docstring); each part from the cache when there."""
    start = time.perf_counter()
    graph = to_graph(model)
    groups = channel_groups(graph, shapes)
    job = _Job(model, calib, shapes, seed, threads, Context(calib=calib, seed=seed, model=model, input_shapes=shapes,
                                                           threads=threads), target_latency=target_latency)
    note_unprunable(job.ctx, groups)
    candidates = prune_mod.candidate_groups(groups, job.ctx, multiple) if "prune" in goal.using else []
    implants = lowrank_mod.candidate_layers(graph, job.ctx) if "lowrank" in goal.using else []
    layers = [l for l in find_layers(graph) if l.values is not None and l.values.size >= 2
              and np.isfinite(l.values).all()]
    layer_names = sorted(l.name for l in layers)
    costs, base = _layer_costs(model, shapes, layers, candidates)

    # the channel order prune(keep=...) will cut in: the pass's default criterion, ranked the same way here
    criterion = get_pass("prune").bind({})["criterion"]
    prune_path = cache_path(model, calib, seed, "prune", [multiple, list(PRUNE_LEVELS), criterion], latency_key)
    book_path = cache_path(model, calib, seed, "codebook" if goal.sensitivity == "measured" else "codebook-hessian",
                           [list(CODEBOOK_BITS), layer_names])
    lowrank_path = cache_path(model, calib, seed, "lowrank", [list(LOWRANK_LEVELS), implants], latency_key)
    prune_part = read_cache(prune_path, cache) if candidates else {"knobs": [], "latency": 0.0}
    book_part = read_cache(book_path, cache) if "codebook" in goal.using else {"knobs": [], "bits": {}}
    lowrank_part = read_cache(lowrank_path, cache) if implants else {"knobs": [], "latency": 0.0}
    steps = (0 if prune_part else len(candidates) * len(PRUNE_LEVELS) * (2 if target_latency else 1)
             + (1 if target_latency else 0)) + (0 if book_part else len(CODEBOOK_BITS) * (
                 (len(layers) if goal.sensitivity == "measured" else 0) + 1) + (goal.sensitivity != "measured")) \
        + (0 if lowrank_part else len(implants) * len(LOWRANK_LEVELS) + (1 if target_latency else 0))
    job.bar = Progress(say, steps, "measuring sensitivity")
    if steps:
        job.holdout = table_samples(calib)
        job.reference = runtime.run(model, job.holdout, threads=threads)

    if prune_part is None:
        prune_part = _measure_prune(job, candidates, criterion, multiple)
        if cache:
            write_cache(prune_path, prune_part)
    if book_part is None:
        book_part = _measure_codebook(job, layer_names, costs, goal.sensitivity, candidates)
        if cache:
            write_cache(book_path, book_part)
    if lowrank_part is None:
        lowrank_part = _measure_lowrank(job, implants, costs, prune_part["latency"])
        if cache:
            write_cache(lowrank_path, lowrank_part)
    return _assemble(costs, base, prune_part, book_part, lowrank_part, round(time.perf_counter() - start, 2),
                     cached=not steps)


def _layer_costs(model: onnx.ModelProto, shapes, layers, candidates) -> tuple[dict[str, LayerCost], dict]:
    """Each weight layer's parameters, MACs and stored bits, with the share of its channels each candidate group
    cuts; and the starting model's packed bytes and MACs."""
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
    return costs, {"bytes": float(size["packed"]), "macs": float(stats["macs"]), "latency": 0.0}


def _measure_prune(job: _Job, candidates, criterion: str, multiple: int) -> dict:
    """Per candidate group: prune's own sensitivity curve (loss at each level, compensated), and for latency goals
    the seconds saved on the target by each cut."""
    part = {"version": CACHE_VERSION, "knobs": [], "latency": 0.0}
    ranking = prune_mod.rank_channels(candidates, job.ctx, criterion=criterion, scope="layer", multiple=multiple,
                                      compensate=True)
    for g in ranking.groups:  # prune's own sensitivity curves, one group at a time for the bar
        curves: dict = {}
        prune_mod.sensitivity_scores(job.ctx, [g], ranking.scores, multiple, True, curves)
        for _ in PRUNE_LEVELS:
            job.bar.step(f"prune {g.name}")
        points = curves.get(g, [(0, 0.0)])
        knob = Knob("prune", g.name, [g.size - k for k, _ in points], [float(v) for _, v in points], size=g.size)
        if job.target_latency is not None:
            if not part["latency"]:
                part["latency"] = job.target_latency(job.model)
                job.bar.step("latency of the starting model")
            knob.latency_saved = _latency_saved(job, g, knob.choices, ranking.scores[g], part["latency"])
        part["knobs"].append(asdict(knob))
    return part


def _latency_saved(job: _Job, group, choices: list, scores, start: float) -> list[float]:
    """Seconds saved on the target when `group` keeps each of `choices` channels (its best by `scores`), made
    non-decreasing."""
    saved = [0.0]
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    for kept in choices[1:]:
        g2 = to_graph(job.model)  # weights do not change the timing: cut, no compensation
        twin = next(t for t in channel_groups(g2, job.shapes) if t.prunable and t.name == group.name)
        apply_plan(g2, {twin: np.sort(order[:kept])})
        saved.append(max(0.0, start - job.target_latency(to_model(g2, like=job.model))))
        job.bar.step(f"latency {group.name} keeps {kept}/{group.size}")
    return [float(v) for v in np.maximum.accumulate(saved)]


def _measure_codebook(job: _Job, layer_names: list[str], costs: dict[str, LayerCost], sensitivity: str,
                      candidates) -> dict:
    """Packed bytes of every layer at each width (the real encoding), as a per-parameter part and a fixed part
    (decoder tables, headers: what does not shrink when channels are cut), and per layer the loss of it alone
    clustered at each width (compensated as the pass does), or the Hessian proxy of that loss."""
    part = {"version": CACHE_VERSION, "knobs": [], "bits": {}, "fixed": {}}
    entry = get_pass("codebook")
    halved = _halved(job, candidates)
    sizes = [(m, _float_bytes(m)) for m in (job.model, halved)]  # each model's own packed bytes, measured once
    for bits in CODEBOOK_BITS:  # bytes from the real encoding: every layer clustered, then packed, at two sizes
        full, half = (_layer_bytes(m, entry, job, bits, before) for m, before in sizes)
        for name in layer_names:
            n1, b1 = full.get(name, (costs[name].params, costs[name].params * costs[name].float_bits / 8))
            n2, b2 = half.get(name, (n1, b1))
            slope = (b1 - b2) / (n1 - n2) if n2 < n1 else b1 / n1
            fixed = b1 - slope * n1
            if fixed < 0 or slope < 0:  # no clean affine fit: all of it per parameter
                slope, fixed = b1 / n1, 0.0
            part["bits"].setdefault(name, {})[str(bits)] = round(8 * slope, 4)
            part["fixed"].setdefault(name, {})[str(bits)] = round(fixed, 2)
        job.bar.step(f"packed size of every layer at {bits} bits")
    if sensitivity == "hessian":  # HAWQ-V2 proxy: ½·Tr(H)/n·‖Q(W)−W‖² (plain k-means, not compensated)
        from . import hessian  # noqa: PLC0415  (only this option needs it)
        proxy = hessian.codebook_proxy(job.model, job.holdout, CODEBOOK_BITS, seed=job.seed, threads=job.threads)
        job.bar.step("Hessian traces")
        for name in layer_names:
            if name in proxy:
                part["knobs"].append(asdict(Knob("codebook", name, [0, *CODEBOOK_BITS],
                                                 [float(v) for v in proxy[name]])))
    for name in (layer_names if sensitivity == "measured" else []):
        # loss: this layer alone clustered (compensated as the pass does)
        loss = [0.0]
        for bits in CODEBOOK_BITS:
            g2 = to_graph(job.model)
            entry.obj(g2, job.context(), **entry.bind({"bits": bits, "head_bits": 0,
                                                         "skip": [n for n in layer_names if n != name]}))
            loss.append(job.loss(to_model(g2, like=job.model)))
            job.bar.step(f"codebook {name} at {bits} bits")
        part["knobs"].append(asdict(Knob("codebook", name, [0, *CODEBOOK_BITS], loss)))
    return part


def _halved(job: _Job, candidates) -> onnx.ModelProto:
    """The model with every candidate group cut to half its channels (weights as they are): the second size the
    per-layer bytes are measured at."""
    g2 = to_graph(job.model)
    names = {g.name for g in candidates}
    plan = {t: np.arange(max(1, t.size // 2)) for t in channel_groups(g2, job.shapes) if t.prunable and t.name in names}
    if plan:
        apply_plan(g2, plan)
    return to_model(g2, like=job.model)


def _float_bytes(model: onnx.ModelProto) -> tuple[dict[str, int], float, dict[str, float]]:
    """({layer: parameters}, the model's packed bytes, {layer: its packed bytes}) as the model stands."""
    counts = {l.name: int(l.values.size) for l in find_layers(to_graph(model)) if l.values is not None}
    size = pack.size_report(model)
    layers = {name: v * counts[name] / 8 for name, v in size["bits_per_param"]["layers"].items() if counts.get(name)}
    return counts, float(size["packed"]), layers


def _layer_bytes(model: onnx.ModelProto, entry, job: _Job, bits: int, before: tuple) -> dict[str, tuple[int, float]]:
    """{layer: (parameters, packed bytes)} of `model` (`before`: its `_float_bytes`) with every layer clustered at
    `bits` (not compensated). A clustered layer's bytes include its share of what the container's graph grew by
    (the decode nodes and their tensor names), split evenly over the clustered layers."""
    counts, packed_before, layers_before = before
    g2 = to_graph(model)
    ctx = job.context()
    entry.obj(g2, ctx, **entry.bind({"bits": bits, "compensate": False, "head_bits": 0}))
    size = pack.size_report(to_model(g2, like=model))
    layers = {name: (counts[name], v * counts[name] / 8) for name, v in size["bits_per_param"]["layers"].items()
              if counts.get(name)}
    clustered = [row["layer"] for row in ctx.details.get("per_layer", []) if row["layer"] in layers]
    grown = (size["packed"] - sum(b for _, b in layers.values())) \
        - (packed_before - sum(layers_before.get(name, 0.0) for name in layers))
    for name in clustered:
        n, b = layers[name]
        layers[name] = (n, b + max(0.0, grown) / len(clustered))
    return layers


def _measure_lowrank(job: _Job, implants: list[str], costs: dict[str, LayerCost], start_latency: float) -> dict:
    """Per low-rank candidate: the layer alone factorized at each rank (fitted and refit as the pass does): its
    loss, MACs and parameters kept, and for latency goals the seconds saved on the target."""
    part = {"version": CACHE_VERSION, "knobs": [], "latency": 0.0}
    entry = get_pass("lowrank")
    base_params = metrics.count_params(job.model)
    if job.target_latency is not None:
        part["latency"] = start_latency or job.target_latency(job.model)
        job.bar.step("latency of the starting model")
    for name in implants:
        others = [n for n in implants if n != name]
        knob = Knob("lowrank", name, [0.0], [0.0], latency_saved=[0.0] if job.target_latency else None,
                    macs_kept=[1.0], params_kept=[1.0])
        for level in LOWRANK_LEVELS:
            g2 = to_graph(job.model)
            c2 = job.context()
            entry.obj(g2, c2, **entry.bind({"layer_rank": [f"{name}={level}"], "skip": others}))
            job.bar.step(f"lowrank {name} at rank {level:g}")
            if not c2.details.get("layers"):
                continue  # not factorized at this rank (no fewer MACs than the layer): no choice
            factored = to_model(g2, like=job.model)
            per_node = metrics.summary(factored, job.shapes)["macs_per_node"]
            knob.choices.append(float(level))
            knob.loss.append(job.loss(factored))
            knob.macs_kept.append((per_node.get(name, 0) + per_node.get(f"{name}_lowrank", 0))
                                  / max(costs[name].macs, 1))
            knob.params_kept.append(1.0 - (base_params - metrics.count_params(factored)) / costs[name].params)
            if job.target_latency is not None:
                knob.latency_saved.append(max(knob.latency_saved[-1], part["latency"] - job.target_latency(factored)))
        if len(knob.choices) > 1:
            part["knobs"].append(asdict(knob))
    return part


def _assemble(costs: dict[str, LayerCost], base: dict, prune_part: dict, book_part: dict, lowrank_part: dict,
              seconds: float, cached: bool) -> Tables:
    """The three parts (measured now or read back) as one Tables."""
    for name, per_bits in book_part["bits"].items():
        if name in costs:
            costs[name].bits = {int(b): v for b, v in per_bits.items()}
            costs[name].fixed = {int(b): v for b, v in book_part["fixed"].get(name, {}).items()}
    base["latency"] = float(prune_part["latency"] or lowrank_part["latency"])
    knobs = [Knob(**k) for k in prune_part["knobs"] + lowrank_part["knobs"] + book_part["knobs"]]
    layer_bytes = sum(c.params * c.float_bits / 8 for c in costs.values())
    layer_macs = sum(c.macs for c in costs.values())
    other = {"bytes": max(0.0, base["bytes"] - layer_bytes), "macs": max(0.0, base["macs"] - layer_macs)}
    return Tables(knobs, list(costs.values()), base, other, seconds, cached=cached)
