"""Retrain-free compensation after channel removal: refit the layers whose inputs the cut changed.

After `channels.apply_plan`, every Conv/Gemm/MatMul that read a cut group (a *consumer*) sees fewer input
channels, and every later layer sees slightly different inputs. Layer by layer, in graph order, on the
already-pruned and already-repaired network, each such layer's weights are refit by ridge least squares so that
its output on calibration activations matches the UNPRUNED model's output (ThiNet, Luo et al. 2017; Channel
Pruning, He et al. 2017):

    W = argmin ‖X W − Y‖² + λ‖W − W₀‖²        X: pruned-network inputs (im2col rows for a Conv, numpy stride
                                                tricks, spatial positions subsampled), Y: original outputs of
                                                the kept channels, W₀: a prior

The ridge term pulls toward a prior, never toward zero: a Gemm after Flatten has far more inputs than calibration
images, and zero is the worst guess there is. Two priors are tried: the cut original weights, and *merged*
weights in which every removed channel is regressed on the kept channels at the same positions (few unknowns,
well determined even with 256 images) and folded into their weights (Neuron Merging, Kim et al. 2020).
Candidates — no change, bias correction for the mean shift (Nagel et al. 2019), the merged weights, ridge refits
toward either prior with λ on a grid, a ReLU-aware refit that ignores errors a following ReLU hides, and for
BatchNormalization re-estimated statistics — are compared on held-out calibration images (every 4th) with the
loss measured after the next nonlinearity (BN→ReLU applied to both sides). The winner is refit on all
calibration images and kept only if it beats no change, so no repair can make a layer worse on held-out data.
Deterministic (row sampling seeded by ctx.seed, one BLAS thread), solved per layer, never per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

import numpy as np
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view

from squeeze import runtime
from squeeze.context import Context
from squeeze.threads import single_threaded
from squeeze.data import HOLDOUT_EVERY, Dataset, holdout
from squeeze.model import to_graph, to_model

from .channel_space import Group
from .cutting import tensor_masks
from .graph_util import infer_shapes, node_labels, set_constant_input, topological_order, weight_value
from .im2col import auto_pad, conv_windows, fixed_pads, window_rows
from .ridge import Ridge

#: Ridge strengths tried, relative to the mean diagonal of XᵀX.
ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Activations kept in memory for compensation (calibration samples are capped to fit).
MEMORY_BUDGET = 1 << 30
#: Work budget for one Gram matrix (rows × columns²); rows are subsampled to fit.
GRAM_FLOPS = 2e9
#: Rounds of the ReLU-aware refit (each one solve with the factorisation already made). It converges slowly:
#: on mnist_burn prune(ratio=0.3) conv3's held-out loss is 0.055 after 3 rounds, 0.049 after 10, 0.046 after 30.
RELU_ITERATIONS = 10


@dataclass
class _Layer:
    node: gs.Node
    kind: str             # "conv" | "convt" | "gemm" | "matmul" | "bn"
    x: str                # input tensor (read from the pruned network)
    y: str                # target tensor (read from the original network)
    bias_node: gs.Node | None = None  # MatMul: the Add that holds its bias
    bias_index: int = 1
    label: str = ""


# ------------------------------------------------------------------------------------------------ driver


def compensate(graph: gs.Graph, ctx: Context, plan: Mapping[Group, np.ndarray], *, downstream: bool = True,
               data: Dataset | None = None, refit_all: bool = True, cache: dict | None = None,
               notes: bool = True, changed: Collection[gs.Node] = ()) -> list[dict]:
    """Refit, in graph order, every layer that reads a cut group — and, with `downstream`, every later
    Conv/Gemm/MatMul whose input changed — and re-estimate BatchNorm statistics downstream of the cut.

    `graph` is the already-cut graph; `ctx.model` the unpruned model, `data` the calibration samples (default
    `ctx.calib`, capped to a memory budget). `refit_all=False` keeps the fit on the non-held-out samples (for
    honest held-out measurements); `cache` holds the unpruned model's activations across calls. `changed`: nodes
    another pass rewrote (lowrank's factors), left as they are; what reads their outputs, directly or not, is
    refit as if it were downstream of a cut (the channels stay as they are). Returns one report row per layer.
    """
    if ctx.model is None:
        if notes:
            ctx.note("compensation skipped: no reference model")
        return []
    if ctx.calib_is_synthetic:
        if notes:
            ctx.note("compensation skipped: the calibration data is synthetic (give --calib with real inputs)")
        return []
    layers, skipped = _layers(graph, plan, downstream, changed)
    if notes:
        for text in skipped:
            ctx.note(text)
    if not layers:
        return []
    with single_threaded("blas"):
        rows, n, held = _compensate(graph, ctx, plan, layers, data, refit_all, cache)
    changed = [r for r in rows if r["method"] != "none"]
    if rows and notes:
        ctx.note(f"compensation refit {len(changed)} of {len(rows)} layer(s) on {n} calibration samples "
                 f"({held} held out to choose): " + ", ".join(f"{r['node']} {r['method']}" for r in rows))
    return rows


@dataclass
class _Fit:
    """What every layer fitter shares: held-out samples, row sampling, the unpruned activations."""

    holdout: np.ndarray
    rng: np.random.Generator
    original: dict[str, np.ndarray]
    refit_all: bool
    masks: dict = field(default_factory=dict)          # tensor → kept channel positions (channels.Cut)
    full: dict[str, np.ndarray] = field(default_factory=dict)  # unpruned inputs of the layers, all channels
    weights: dict[int, tuple] = field(default_factory=dict)    # id(node) → unpruned (weight, bias)


def _compensate(graph, ctx, plan, layers, data, refit_all, cache) -> tuple[list[dict], int, int]:
    masks = tensor_masks(plan)
    data = data if data is not None else _budgeted(ctx, graph, layers)
    shift = 0 if all(data.stacked.get(k, True) for k in data.arrays) else 1
    names = sorted({layer.y for layer in layers} | {layer.x for layer in layers if layer.kind == "bn"})
    weights = _unpruned_weights(graph, ctx.model)
    merging = {layer.x for layer in layers if layer.kind != "bn" and layer.x in masks and id(layer.node) in weights}
    names = sorted(set(names) | merging)
    cache = cache if cache is not None else {}
    missing = [name for name in names if name not in cache]
    if missing:
        cache.update(runtime.activations(ctx.model, data, missing, threads=ctx.threads))
    original = {}
    for name in names:
        value = _select(cache[name], masks.get(name), shift)
        original[name] = value[:, 0] if shift else value
    n = len(data)
    held = holdout(n) if n >= 2 * HOLDOUT_EVERY else np.zeros(n, bool)
    full = {name: (cache[name][:, 0] if shift else cache[name]) for name in merging}
    fit = _Fit(held, np.random.default_rng(ctx.seed), original, refit_all, masks, full, weights)
    rows: list[dict] = []
    pending = list(layers)
    graph_inputs = {t.name for t in graph.inputs}
    # Each wave's inputs are recomputed from the values before the layers the last wave refit, not from the model's
    # inputs: on a network with a BatchNormalization after every conv, one model run instead of one per wave.
    partial = runtime.Partial(data, runtime.input_specs(ctx.model), threads=ctx.threads, budget=MEMORY_BUDGET)
    ancestors = {id(layer.node): _ancestors(layer.node) for layer in layers}  # refits change no edge
    while pending:
        wave = _ready(pending, ancestors)
        wanted = sorted({layer.x for layer in wave} - graph_inputs)
        current = partial.values(to_model(graph, like=ctx.model), wanted) if wanted else {}
        for name in {layer.x for layer in wave} & graph_inputs:
            current[name] = data.arrays[name] if shift == 0 else data.arrays[name][:, None]
        for layer in wave:
            x = current[layer.x][:, 0] if shift else current[layer.x]
            rows.append(FITTERS[layer.kind](graph, layer, x, original[layer.y], fit))
        partial.forget(_descendants([n for layer in wave for n in (layer.node, layer.bias_node) if n is not None]))
        pending = [layer for layer in pending if layer not in wave]
    return rows, n, int(held.sum())


def _descendants(nodes: list[gs.Node]) -> set[str]:
    """Names of the tensors that `nodes` write and of every tensor computed from them."""
    names: set[str] = set()
    stack = [t for node in nodes for t in node.outputs]
    while stack:
        t = stack.pop()
        if t.name in names:
            continue
        names.add(t.name)
        stack.extend(out for reader in t.outputs for out in reader.outputs)
    return names


def _unpruned_weights(graph: gs.Graph, model) -> dict[int, tuple]:
    """id(node) → (weight, bias or None) before the cut, for the Conv/ConvTranspose/Gemm/MatMul nodes of `graph`,
    read from the unpruned model (node lists correspond one to one: the cut adds and removes no node). A
    ConvTranspose weight is given as the weight of its equivalent Conv (`conv_transpose_as_conv`)."""
    original = to_graph(model)
    if len(original.nodes) != len(graph.nodes) or any(a.op != b.op for a, b in zip(original.nodes, graph.nodes)):
        return {}
    out = {}
    for node, before in zip(graph.nodes, original.nodes):
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(before.inputs) > 1:
            weight = weight_value(before.inputs[1])
            if node.op == "ConvTranspose" and weight is not None:
                weight = conv_transpose_as_conv(weight)
            bias = weight_value(before.inputs[2]) if len(before.inputs) > 2 and before.inputs[2].name else None
            if node.op == "MatMul" and len(before.outputs[0].outputs) == 1 and before.outputs[0].outputs[0].op == "Add":
                add = before.outputs[0].outputs[0]
                bias = next((weight_value(t) for t in add.inputs if t is not before.outputs[0]
                             and weight_value(t) is not None), None)
            if weight is not None:
                out[id(node)] = (weight, bias)
    return out


def _merged(layer: _Layer, fit: _Fit, kind: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The layer's weights with each removed input channel folded into the kept ones: on the unpruned
    calibration activations (non-held-out samples), every removed channel is regressed on the kept channels
    at the same position, x_r ≈ Σ_k a_kr x_k + c_r, and the layer then reads a_kr·w_r through channel k and
    c_r·Σw_r as bias (as in Neuron Merging, Kim et al. 2020). Few unknowns, so it holds where a full refit has
    more inputs than calibration rows. Returned in `refit` layout ([inputs, outputs], [outputs])."""
    cut = fit.masks.get(layer.x)
    before = fit.weights.get(id(layer.node))
    x = fit.full.get(layer.x)
    if cut is None or before is None or x is None or cut.keep.all():
        return None
    keep, gone = np.flatnonzero(cut.keep), np.flatnonzero(~cut.keep)
    width = len(cut.keep)
    samples = x[~fit.holdout] if (~fit.holdout).any() else x
    feats = np.moveaxis(samples, cut.axis, -1).reshape(-1, cut.outer, width, cut.inner)
    feats = np.moveaxis(feats, 2, -1).reshape(-1, width)
    if len(feats) > 65536:
        feats = feats[np.sort(fit.rng.choice(len(feats), 65536, replace=False))]
    xk = _augment(feats[:, keep].astype(np.float32), True)
    a = Ridge(xk).solve(feats[:, gone].astype(np.float64), 1e-4)  # [kept + 1, removed]
    w, bias = before
    w = w.astype(np.float64)
    if kind == "conv":  # [M, C, k...]
        merged = w[:, keep] + np.einsum("kr,mr...->mk...", a[:-1], w[:, gone], optimize=True)
        gone_sum = w[:, gone].reshape(w.shape[0], len(gone), -1).sum(axis=2)
        b = (bias.astype(np.float64) if bias is not None else np.zeros(w.shape[0])) \
            + np.einsum("r,mr->m", a[-1], gone_sum, optimize=True)
        out_cut = fit.masks.get(layer.y)
        if out_cut is not None and not out_cut.keep.all():
            rows = out_cut.indices()
            merged, b = merged[rows], b[rows]
        return merged.reshape(merged.shape[0], -1).T, b
    node = layer.node
    if kind == "gemm":
        trans_b = int(node.attrs.get("transB", 0))
        w = (w.T if trans_b else w) * float(node.attrs.get("alpha", 1.0))
        b = float(node.attrs.get("beta", 1.0)) * bias.astype(np.float64).reshape(-1) if bias is not None else None
    else:
        b = bias.astype(np.float64).reshape(-1) if bias is not None else None
    n = w.shape[1]
    blocks = w.reshape(cut.outer, width, cut.inner, n)
    merged = blocks[:, keep] + np.einsum("kr,orin->okin", a[:-1], blocks[:, gone], optimize=True)
    shift = np.einsum("r,orin->n", a[-1], blocks[:, gone], optimize=True)
    b = (b if b is not None and b.size == n else np.zeros(n) if b is None else np.broadcast_to(b, (n,))) + shift
    merged = merged.reshape(-1, n)
    out_cut = fit.masks.get(layer.y)
    if out_cut is not None and not out_cut.keep.all():
        cols = out_cut.indices()
        merged, b = merged[:, cols], b[cols]
    return merged, b


def _layers(graph: gs.Graph, plan: Mapping[Group, np.ndarray], downstream: bool,
            changed: Collection[gs.Node] = ()) -> tuple[list[_Layer], list[str]]:
    """The consumers of the cut groups, plus BatchNormalizations (and, with `downstream`, Conv/Gemm/MatMul)
    downstream of any cut or of a `changed` node (never those nodes themselves), in graph order."""
    order = {id(n): i for i, n in enumerate(topological_order(graph))}
    labels = node_labels(graph)
    chosen: dict[int, _Layer] = {}
    skipped = []
    for group in plan:
        for m in group.consumers:
            if id(m.node) in chosen:
                continue
            layer = _layer_for(m.node, labels[id(m.node)])
            if layer is None:
                why = conv_transpose_problem(m.node) if m.op == "ConvTranspose" else None
                skipped.append(f"compensation: {m.op} '{labels[id(m.node)]}' is not refit "
                               f"({why or 'unsupported form'})")
            else:
                chosen[id(m.node)] = layer
    tensors = graph.tensors()
    frontier = [tensors[s.tensor] for g in plan for s in g.slots if s.tensor in tensors]
    frontier += [t for n in changed for t in n.outputs]
    seen: set[int] = {id(n) for n in changed}  # their outputs are in the frontier already
    while frontier:
        t = frontier.pop()
        for node in t.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "BatchNormalization" and id(node) not in chosen and _bn_constant(node):
                chosen[id(node)] = _Layer(node, "bn", node.inputs[0].name, node.outputs[0].name,
                                          label=labels[id(node)])
            elif downstream and node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and id(node) not in chosen:
                layer = _layer_for(node, labels[id(node)])
                if layer is not None:
                    chosen[id(node)] = layer
            frontier.extend(node.outputs)
    return sorted(chosen.values(), key=lambda layer: order[id(layer.node)]), skipped


def _layer_for(node: gs.Node, label: str) -> _Layer | None:
    if weight_value(node.inputs[1]) is None:
        return None
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1:
        return _Layer(node, "conv", node.inputs[0].name, node.outputs[0].name, label=label)
    if node.op == "ConvTranspose" and conv_transpose_problem(node) is None:
        return _Layer(node, "convt", node.inputs[0].name, node.outputs[0].name, label=label)
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return _Layer(node, "gemm", node.inputs[0].name, node.outputs[0].name, label=label)
    if node.op == "MatMul" and weight_value(node.inputs[1]).ndim == 2:
        out = node.outputs[0]
        n = weight_value(node.inputs[1]).shape[1]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add":
            add = out.outputs[0]
            for i, t in enumerate(add.inputs):
                value = weight_value(t)
                if t is not out and value is not None and value.size == n and value.shape[-1] == n:
                    return _Layer(node, "matmul", node.inputs[0].name, add.outputs[0].name, add, i, label)
        return _Layer(node, "matmul", node.inputs[0].name, out.name, label=label)
    return None


def _bn_constant(node: gs.Node) -> bool:
    return all(weight_value(t) is not None for t in node.inputs[1:5]) and not node.attrs.get("training_mode", 0)


def _ready(pending: list[_Layer], ancestors: dict[int, set[int]]) -> list[_Layer]:
    """The pending layers whose inputs no other pending layer influences (`ancestors`: id(node) → `_ancestors`)."""
    ids = {id(layer.node) for layer in pending}
    wave = []
    for layer in pending:
        if not ancestors[id(layer.node)] & (ids - {id(layer.node)}):
            wave.append(layer)
    return wave or pending[:1]


def _ancestors(node: gs.Node) -> set[int]:
    seen: set[int] = set()
    stack = [t for t in node.inputs]
    while stack:
        t = stack.pop()
        for producer in t.inputs:
            if id(producer) not in seen:
                seen.add(id(producer))
                stack.extend(producer.inputs)
    return seen


def _budgeted(ctx: Context, graph: gs.Graph, layers: list[_Layer]):
    """The calibration data, capped so that the activations compensation holds stay within MEMORY_BUDGET."""
    shapes = infer_shapes(graph, ctx.input_shapes)
    per_sample = 0
    for layer in layers:
        for name in (layer.x, layer.y):
            shape = shapes.get(name)
            if shape is not None and all(d is not None for d in shape):
                per_sample += 8 * int(np.prod(shape))  # float32 original + pruned, and a working copy
    limit = max(16, MEMORY_BUDGET // max(per_sample, 1))
    if len(ctx.calib) > limit:
        ctx.note(f"compensation uses the first {limit} of {len(ctx.calib)} calibration samples (memory budget)")
        return ctx.calib.subset(0, limit)
    return ctx.calib


def _select(value: np.ndarray, cut, shift: int) -> np.ndarray:
    """The original tensor restricted to the channels the pruned network keeps."""
    if cut is None or cut.keep.all():
        return value
    return np.take(value, cut.indices(), axis=cut.axis + shift)


# ------------------------------------------------------------------------------------- post-op (nonlinearity)


@dataclass
class PostOp:
    """What the network applies to a layer's output up to and including its next nonlinearity, on channel-last
    rows [R, C]: a per-channel affine map (folded BatchNormalizations), then an activation (or none).
    `floor` is True when the activation is ReLU-like (zero below 0), which the ReLU-aware refit exploits."""

    scale: np.ndarray | float = 1.0
    shift: np.ndarray | float = 0.0
    activation: Callable[[np.ndarray], np.ndarray] | None = None
    floor: bool = False

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = rows * self.scale + self.shift
        return self.activation(rows) if self.activation is not None else rows


def post_op(tensor: gs.Tensor, trailing: int | None = None) -> PostOp:
    """The PostOp after `tensor`: per-channel affine steps (constant BatchNormalization; with `trailing`, the
    number of axes after the channel axis, also an Add/Sub/Mul/Div by a scalar or per-channel constant — a bias
    kept outside the layer), then an activation: one op (ReLU, LeakyRelu, Clip, Sigmoid, Tanh, HardSigmoid,
    HardSwish) or a decomposed one (`ACTIVATION_PATTERNS`: GELU, x·HardSigmoid(x), x·Sigmoid(x)); the identity
    when something else comes first (e.g. a residual Add)."""
    op = PostOp()
    for _ in range(8):
        if len(tensor.outputs) == 1:
            node = tensor.outputs[0]
            affine = _affine_step(node, tensor, trailing)
            if affine is not None:
                scale, shift = affine
                op.scale, op.shift = op.scale * scale, op.shift * scale + shift
                tensor = node.outputs[0]
                continue
            op.activation = _activation(node)
            op.floor = node.op == "Relu" or (node.op == "Clip" and _clip_bounds(node)[0] == 0.0)
        else:
            op.activation = next((fn for match, fn in ACTIVATION_PATTERNS if match(tensor)), None)
        break
    return op


def _affine_step(node: gs.Node, x: gs.Tensor, trailing: int | None) -> tuple | None:
    """(scale, shift) of `node` as a per-channel affine map of `x`, if it is one (else None)."""
    if node.op == "BatchNormalization" and _bn_constant(node):
        gamma, beta, mean, var = (weight_value(t).astype(np.float64) for t in node.inputs[1:5])
        scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return scale, beta - mean * scale
    if trailing is None or node.op not in ("Add", "Sub", "Mul", "Div") or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    c = weight_value(other) if other is not x else None
    if c is None or (node.op in ("Sub", "Div") and node.inputs[0] is not x):
        return None
    shape = list(c.shape)
    while shape and shape[0] == 1 and len(shape) > trailing + 1:
        shape.pop(0)
    if c.size != 1 and (len(shape) != trailing + 1 or any(d != 1 for d in shape[1:])):
        return None  # not constant along the positions
    v = c.astype(np.float64).reshape(-1)
    v = v[0] if v.size == 1 else v
    return {"Add": (1.0, v), "Sub": (1.0, -v), "Mul": (v, 0.0 * v), "Div": (1.0 / v, 0.0 * v)}[node.op]


def _scalar_operand(node: gs.Node, x: gs.Tensor) -> float | None:
    """The scalar constant `node` combines `x` with (None if there is none)."""
    if len(node.inputs) != 2 or x not in node.inputs:
        return None
    other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    value = weight_value(other)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _is_gelu(x: gs.Tensor) -> bool:
    """x·0.5·(1 + erf(x/√2)) as exporters write it: x read by a Div/Mul by a scalar feeding Erf, and by a Mul."""
    ops = sorted(n.op for n in x.outputs)
    scaled = [n for n in x.outputs if n.op in ("Div", "Mul") and _scalar_operand(n, x) is not None
              and len(n.outputs[0].outputs) == 1 and n.outputs[0].outputs[0].op == "Erf"]
    return len(x.outputs) == 2 and bool(scaled) and "Mul" in ops


def _gated_by(gate: str) -> Callable[[gs.Tensor], bool]:
    """x·gate(x): x read by the `gate` op and by the Mul that multiplies x with the gate's output."""
    def match(x: gs.Tensor) -> bool:
        gates = [n for n in x.outputs if n.op == gate]
        return len(x.outputs) == 2 and len(gates) == 1 and any(
            n.op == "Mul" and len(n.inputs) == 2 and {id(t) for t in n.inputs} == {id(x), id(gates[0].outputs[0])}
            for n in x.outputs)
    return match


def _gelu_fn(r: np.ndarray) -> np.ndarray:
    return 0.5 * r * (1.0 + np.tanh(0.7978845608 * (r + 0.044715 * r ** 3)))  # tanh form: within 1e-3 of erf's


#: Activations exporters decompose into several ops, matched on the tensor they read: one line per pattern.
ACTIVATION_PATTERNS: list[tuple[Callable[[gs.Tensor], bool], Callable[[np.ndarray], np.ndarray]]] = [
    (_is_gelu, _gelu_fn),
    (_gated_by("HardSigmoid"), lambda r: r * np.clip(r / 6.0 + 0.5, 0.0, 1.0)),
    (_gated_by("Sigmoid"), lambda r: r / (1.0 + np.exp(-r))),
]


def _clip_bounds(node: gs.Node) -> tuple[float, float]:
    lo = node.attrs.get("min") if "min" in node.attrs else (
        weight_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None)
    hi = node.attrs.get("max") if "max" in node.attrs else (
        weight_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None)
    return (-np.inf if lo is None else float(np.asarray(lo))), (np.inf if hi is None else float(np.asarray(hi)))


def _activation(node: gs.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    if node.op == "Relu":
        return lambda r: np.maximum(r, 0.0)
    if node.op == "LeakyRelu":
        alpha = float(node.attrs.get("alpha", 0.01))
        return lambda r: np.where(r > 0, r, alpha * r)
    if node.op == "Clip":
        lo, hi = _clip_bounds(node)
        return lambda r: np.clip(r, lo, hi)
    if node.op == "Sigmoid":
        return lambda r: 1.0 / (1.0 + np.exp(-r))
    if node.op == "Tanh":
        return np.tanh
    if node.op == "HardSwish":
        return lambda r: r * np.clip(r / 6.0 + 0.5, 0.0, 1.0)
    if node.op == "HardSigmoid":
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        return lambda r: np.clip(alpha * r + beta, 0.0, 1.0)
    return None


# ------------------------------------------------------------------------------------------ least squares


def _relative_loss(pred: np.ndarray, target: np.ndarray) -> float:
    denom = float((target ** 2).sum())
    return float(((pred - target) ** 2).sum()) / (denom if denom > 0 else 1.0)


def refit(xt: np.ndarray, yt: np.ndarray, xh: np.ndarray, yh: np.ndarray, w0: np.ndarray, b0: np.ndarray | None,
          post: PostOp, refit_all: bool = True, merged: tuple[np.ndarray, np.ndarray | None] | None = None
          ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Choose by the held-out loss after `post` among: no change, bias correction, `merged` weights (the removed
    channels folded into the kept ones), and ridge refits toward either — plain, and ReLU-aware when a ReLU
    follows; then (with `refit_all`) refit the winner on all rows. x: [rows, inputs], y: [rows, outputs],
    w0: [inputs, outputs] the cut weights; b0 None means no bias is fitted."""
    fit_bias = b0 is not None
    in_sample = xh is xt
    target_h = post(yh)
    xh = xh.astype(np.float64)
    n_in = w0.shape[0]

    def stack(w, b):
        return np.vstack([w, b[None, :]]) if fit_bias else w

    def split(wa):
        return wa[:n_in], (wa[n_in] if fit_bias else None)

    def loss(wa):
        w, b = split(wa)
        return _relative_loss(post(xh @ w + (b if b is not None else 0.0)), target_h)

    priors = {"cut": stack(w0, b0)}
    if merged is not None:
        priors["merge"] = stack(merged[0], merged[1] if merged[1] is not None else b0)
    xat = _augment(xt, fit_bias)
    solve = Ridge(xat).solve
    candidates = [("cut", "none", None, loss(priors["cut"]))]
    if "merge" in priors:
        candidates.append(("merge", "none", None, loss(priors["merge"])))
    if fit_bias:
        bias = priors["cut"].copy()
        bias[n_in] += (yt - xat @ priors["cut"]).mean(axis=0)
        candidates.append(("cut", "bias", None, loss(bias)))
    for prior, wa0 in priors.items():
        resid = yt - xat @ wa0
        candidates += [(prior, "ls", alpha, loss(wa0 + solve(resid, alpha))) for alpha in ALPHAS]
    if post.floor:
        prior, _, alpha, _ = min((c for c in candidates if c[1] == "ls"), key=lambda c: c[3])
        candidates.append((prior, "ls-relu", alpha, loss(_relu_fit(xat, yt, priors[prior], solve, alpha, post))))
    prior, method, alpha, best = min(candidates, key=lambda c: c[3])
    info = {"loss_before": candidates[0][3], "loss_after": best,
            "rows": int(len(xt) + (0 if in_sample else len(xh))), "inputs": int(n_in)}
    if best >= candidates[0][3] * (1 - 1e-4):
        return w0, b0, {**info, "method": "none", "loss_after": candidates[0][3]}
    name = ("merge" if prior == "merge" else "") + ("" if method == "none" else
                                                    ("+" if prior == "merge" else "") + method)
    if alpha is not None:
        name += f"(alpha={alpha:g})"
    wa0 = priors[prior]
    if method == "none":
        return (*split(wa0), {**info, "method": name})
    xa, y_all = xat, yt
    if refit_all and not in_sample:
        xa, y_all = np.vstack([xat, _augment(xh, fit_bias)]), np.vstack([yt, yh])
        solve = Ridge(xa).solve
    if method == "bias":
        wa = wa0.copy()
        wa[n_in] += (y_all - xa @ wa0).mean(axis=0)
    elif method == "ls":
        wa = wa0 + solve(y_all - xa @ wa0, alpha)
    else:
        wa = _relu_fit(xa, y_all, wa0, solve, alpha, post)
    return (*split(wa), {**info, "method": name})


def _relu_fit(x: np.ndarray, y: np.ndarray, wa0: np.ndarray, solve, alpha: float, post: PostOp,
              iterations: int = RELU_ITERATIONS) -> np.ndarray:
    """Ridge refit that ignores errors a following ReLU hides: where the target is clipped (zero after the
    ReLU), a prediction that is clipped too counts as exact, and one that is not is pulled to the threshold."""
    scale = np.broadcast_to(np.asarray(post.scale, dtype=np.float64), (y.shape[1],))
    shift = np.broadcast_to(np.asarray(post.shift, dtype=np.float64), (y.shape[1],))
    safe = np.where(scale == 0, 1.0, scale)
    threshold = np.where(scale == 0, 0.0, -shift / safe)
    clipped = (y * scale + shift) <= 0
    wa = wa0 + solve(y - x @ wa0, alpha)
    for _ in range(iterations):
        pred = x @ wa
        target = np.where(clipped, np.where(pred * scale + shift <= 0, pred, threshold), y)
        wa = wa0 + solve(target - x @ wa0, alpha)
    return wa


def _augment(x: np.ndarray, bias: bool) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), dtype=x.dtype)]) if bias else x


def row_budget(cols: int) -> int:
    return int(np.clip(GRAM_FLOPS / max(cols, 1) ** 2, 4 * cols, 65536))


# ---------------------------------------------------------------------------------------------- per layer


def _fit_conv(graph: gs.Graph, layer: _Layer, x: np.ndarray, y: np.ndarray, fit: _Fit) -> dict:
    node = layer.node
    w = weight_value(node.inputs[1])
    return _fit_windows(graph, layer, conv_windows(node, x, w.shape[2:]), w, y, fit, lambda conv_w: conv_w)


def _fit_conv_transpose(graph: gs.Graph, layer: _Layer, x: np.ndarray, y: np.ndarray, fit: _Fit) -> dict:
    """A ConvTranspose is refit as the stride-1 Conv it equals (`conv_transpose_as_conv`): same least squares."""
    node = layer.node
    w = weight_value(node.inputs[1])
    conv_w = conv_transpose_as_conv(w)
    return _fit_windows(graph, layer, transposed_windows(node, x, w.shape[2:]), conv_w, y, fit,
                        conv_transpose_as_conv)


def _fit_windows(graph: gs.Graph, layer: _Layer, windows: np.ndarray, w: np.ndarray, y: np.ndarray, fit: _Fit,
                 stored: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Refit a convolution from its input windows; `w` is its weight in Conv layout [M, C, k...], `stored` maps
    a Conv-layout weight back to the node's own layout."""
    node = layer.node
    out_ch, cols = w.shape[0], int(np.prod(w.shape[1:]))
    bias_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    b0 = weight_value(bias_t).astype(np.float64) if bias_t is not None else np.zeros(out_ch)
    spatial = y.shape[2:]
    budget = row_budget(cols + 1)
    xt, yt, _ = conv_rows(windows, y, np.flatnonzero(~fit.holdout), spatial, budget, fit.rng)
    xh, yh, _ = conv_rows(windows, y, np.flatnonzero(fit.holdout), spatial, max(budget // 3, 1), fit.rng)
    if not len(xh):
        xh, yh = xt, yt
    w0 = w.reshape(out_ch, -1).T.astype(np.float64)
    merged = _checked(_merged(layer, fit, "conv"), w0)
    post = post_op(node.outputs[0], trailing=w.ndim - 2)
    new_w, new_b, info = refit(xt, yt, xh, yh, w0, b0, post, fit.refit_all, merged)
    if info["method"] != "none":
        set_constant_input(graph, node, 1, stored(new_w.T.reshape(w.shape)).astype(w.dtype))
        set_constant_input(graph, node, 2, new_b.astype(w.dtype))
    return {"node": layer.label, "op": node.op, **info}


def conv_transpose_as_conv(w: np.ndarray) -> np.ndarray:
    """The weight [M, C, k...] of the stride-1 Conv that equals a ConvTranspose with weight [C, M, k...] (group 1)
    on its stride-dilated, padded input: in and out axes swapped, every kernel axis flipped. Its own inverse."""
    return np.ascontiguousarray(np.flip(np.swapaxes(w, 0, 1), axis=tuple(range(2, w.ndim))))


def conv_transpose_problem(node: gs.Node) -> str | None:
    """Why a ConvTranspose cannot be refit as a Conv (None when it can): the forms `transposed_windows` covers."""
    if weight_value(node.inputs[1]) is None:
        return "its weight is not a constant"
    if int(node.attrs.get("group", 1)) != 1:
        return f"group={node.attrs.get('group')}"
    if "output_shape" in node.attrs:
        return "it has an output_shape attribute"
    if fixed_pads(node, 0) is None:
        return f"auto_pad={auto_pad(node)}"
    return None


def transposed_windows(node: gs.Node, x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """Windows [N, C, *out_positions, *kernel] of the Conv a ConvTranspose equals: the input with stride−1 zeros
    between samples, padded by dilation·(k−1) − pad at each side (plus output_padding at the end; a negative pad
    crops), read at stride 1 with the ConvTranspose's dilation."""
    d = len(kernel)
    strides = list(node.attrs.get("strides", [1] * d))
    dil = list(node.attrs.get("dilations", [1] * d))
    pads = fixed_pads(node, d)
    extra = list(node.attrs.get("output_padding", [0] * d))
    size = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], strides)]
    up = np.zeros(x.shape[:2] + tuple(size), dtype=x.dtype)
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    edges = [(dil[i] * (kernel[i] - 1) - pads[i], dil[i] * (kernel[i] - 1) - pads[i + d] + int(extra[i]))
             for i in range(d)]
    up = np.pad(up, [(0, 0), (0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in edges])
    crop = tuple(slice(max(-lo, 0), up.shape[2 + i] - max(-hi, 0)) for i, (lo, hi) in enumerate(edges))
    up = up[(slice(None), slice(None)) + crop]
    eff = [dil[i] * (kernel[i] - 1) + 1 for i in range(d)]
    win = sliding_window_view(up, eff, axis=tuple(range(2, 2 + d)))
    return win[(Ellipsis,) + tuple(slice(None, None, s) for s in dil)]


def conv_rows(windows: np.ndarray, y: np.ndarray, images: np.ndarray, spatial, budget: int, rng):
    """im2col rows [R, C·kernel] float32 and the matching output rows [R, M] float64 at up to `budget` output
    positions sampled (without replacement, in order) from `images` (indices into `windows`/`y`), and the image of
    each row. `windows` from `conv_windows`; also blockperm's row sampler."""
    total = len(images) * int(np.prod(spatial))
    if total == 0:
        cols = windows.shape[1] * int(np.prod(windows.shape[2 + len(spatial):]))
        return np.zeros((0, cols), np.float32), np.zeros((0, y.shape[1])), np.zeros(0, np.int64)
    picks = np.sort(rng.choice(total, size=min(budget, total), replace=False))
    patches, (n_idx, *pos) = window_rows(windows, images, picks, spatial)
    rows = patches.reshape(len(picks), -1).astype(np.float32)
    target = y[(n_idx, slice(None)) + tuple(pos)].astype(np.float64)
    return rows, target, n_idx


def _checked(merged, w0: np.ndarray):
    """The merged prior if it has the cut weights' shape (else None: the node lists did not correspond)."""
    return merged if merged is not None and merged[0].shape == w0.shape else None


def _sample_rows(x: np.ndarray, y: np.ndarray, holdout: np.ndarray, n_out: int):
    """Rows of a Gemm/MatMul problem: (train x, train y, held-out x, held-out y); held-out = train if none."""
    xt = x[~holdout].reshape(-1, x.shape[-1]).astype(np.float32)
    yt = y[~holdout].reshape(-1, n_out).astype(np.float64)
    if not holdout.any():
        return xt, yt, xt, yt
    xh = x[holdout].reshape(-1, x.shape[-1]).astype(np.float32)
    return xt, yt, xh, y[holdout].reshape(-1, n_out).astype(np.float64)


def _fit_gemm(graph: gs.Graph, layer: _Layer, x: np.ndarray, y: np.ndarray, fit: _Fit) -> dict:
    node = layer.node
    b = weight_value(node.inputs[1])
    trans_b = int(node.attrs.get("transB", 0))
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    w0 = (b.T if trans_b else b).astype(np.float64) * alpha
    n_out = w0.shape[1]
    c_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    c = weight_value(c_t) if c_t is not None else None
    if c is not None and c.ndim == 2 and c.shape[0] > 1:
        b0 = None  # a per-row C: leave the bias alone
    else:
        b0 = np.broadcast_to(beta * (c.astype(np.float64).reshape(-1) if c is not None else np.zeros(1)),
                             (n_out,)).copy()
    xt, yt, xh, yh = _sample_rows(x, y, fit.holdout, n_out)
    merged = _checked(_merged(layer, fit, "gemm"), w0)
    if b0 is None and merged is not None:
        merged = (merged[0], None)
    new_w, new_b, info = refit(xt, yt, xh, yh, w0, b0, post_op(node.outputs[0], trailing=0), fit.refit_all, merged)
    if info["method"] != "none":
        weight = new_w / alpha
        set_constant_input(graph, node, 1, (weight.T if trans_b else weight).astype(b.dtype))
        if new_b is not None:
            if beta == 0.0:
                node.attrs["beta"] = beta = 1.0
            shape = c.shape if c is not None and c.size == n_out else (n_out,)
            set_constant_input(graph, node, 2, (new_b / beta).reshape(shape).astype(b.dtype))
    return {"node": layer.label, "op": node.op, **info}


def _fit_matmul(graph: gs.Graph, layer: _Layer, x: np.ndarray, y: np.ndarray, fit: _Fit) -> dict:
    node = layer.node
    b = weight_value(node.inputs[1])
    w0 = b.astype(np.float64)
    n_out = w0.shape[1]
    bias = weight_value(layer.bias_node.inputs[layer.bias_index]) if layer.bias_node is not None else None
    b0 = bias.astype(np.float64).reshape(-1) if bias is not None else None
    xt, yt, xh, yh = _sample_rows(x, y, fit.holdout, n_out)
    post = post_op(layer.bias_node.outputs[0] if layer.bias_node is not None else node.outputs[0], trailing=0)
    merged = _checked(_merged(layer, fit, "matmul"), w0)
    if b0 is None and merged is not None:
        merged = (merged[0], None)
    new_w, new_b, info = refit(xt, yt, xh, yh, w0, b0, post, fit.refit_all, merged)
    if info["method"] != "none":
        set_constant_input(graph, node, 1, new_w.astype(b.dtype))
        if new_b is not None:
            set_constant_input(graph, layer.bias_node, layer.bias_index, new_b.reshape(bias.shape).astype(bias.dtype))
    return {"node": layer.label, "op": node.op, **info}


def _fit_bn(graph: gs.Graph, layer: _Layer, x: np.ndarray, y: np.ndarray, fit: _Fit) -> dict:
    """Re-estimate BN statistics so the pruned network's normalised channels have the original's mean and spread."""
    node = layer.node
    gamma, beta, mean, var = (weight_value(t).astype(np.float64) for t in node.inputs[1:5])
    eps = float(node.attrs.get("epsilon", 1e-5))
    z = fit.original[layer.x]
    holdout = fit.holdout

    def rows(a, which):
        a = np.moveaxis(a[which], 1, -1)
        return a.reshape(-1, a.shape[-1]).astype(np.float64)

    train = ~holdout
    xt, zt = rows(x, train), rows(z, train)
    xh, yh = (rows(x, holdout), rows(y, holdout)) if holdout.any() else (xt, rows(y, train))
    sigma = np.sqrt(var + eps)
    s_new = sigma * np.sqrt(xt.var(axis=0) + 1e-12) / np.sqrt(zt.var(axis=0) + 1e-12)
    m_new = xt.mean(axis=0) - s_new * (zt.mean(axis=0) - mean) / sigma
    post = post_op(node.outputs[0])

    def apply(rows_, m, s):
        return gamma * (rows_ - m) / s + beta

    before = _relative_loss(post(apply(xh, mean, sigma)), post(yh))
    after = _relative_loss(post(apply(xh, m_new, s_new)), post(yh))
    info = {"node": layer.label, "op": node.op, "loss_before": before, "rows": int(len(xt) + len(xh)),
            "inputs": int(len(mean))}
    if after >= before * (1 - 1e-4):
        return {**info, "method": "none", "loss_after": before}
    if holdout.any() and fit.refit_all:  # re-estimate on every calibration sample
        xa, za = rows(x, np.ones_like(holdout)), rows(z, np.ones_like(holdout))
        s_new = sigma * np.sqrt(xa.var(axis=0) + 1e-12) / np.sqrt(za.var(axis=0) + 1e-12)
        m_new = xa.mean(axis=0) - s_new * (za.mean(axis=0) - mean) / sigma
    dtype = weight_value(node.inputs[3]).dtype
    set_constant_input(graph, node, 3, m_new.astype(dtype))
    set_constant_input(graph, node, 4, np.maximum(s_new ** 2 - eps, 0.0).astype(dtype))
    return {**info, "method": "bn-stats", "loss_after": after}


FITTERS: dict[str, Callable] = {"conv": _fit_conv, "convt": _fit_conv_transpose, "gemm": _fit_gemm,
                                 "matmul": _fit_matmul, "bn": _fit_bn}
