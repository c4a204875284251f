"""`blockperm`: block-permutation restructuring (MPDCompress) as a graph rewrite, without retraining.

A layer's weight W [m, n] is made block-diagonal after permuting its rows and columns: only B diagonal blocks of
⌈m/B⌉×⌈n/B⌉ are kept and run as independent small products, so the layer has B× fewer weights and MACs
(Supic et al., "MPDCompress — Matrix Permutation Decomposition Algorithm for Deep Neural Network Compression",
arXiv:1805.12085, 2018, trains with such a fixed mask; here a trained model is rewritten).

1. **Search** (`blockperm_search`): balanced co-clustering of the score w² (times E[x²] of each input with real
   calibration data, so the kept blocks carry most of the layer's expected output) — spectral seed, then
   exact balanced assignments (Hungarian) by coordinate ascent, jointly over the layers that share channels.
2. **Fold**: a permutation of a channel group (`coupling.channel_groups`: through BN, activations, residual
   Adds, Flatten→Gemm) is applied to every producer and consumer of the group (`cutting.CUTTERS` with a
   reordering instead of a cut), which costs nothing at run time. Where the analysis forbids it (a graph
   output, a Softmax over the channels, a Concat, a size not divisible by B) or where the folded partition
   would keep clearly less energy than a free one (`fold=auto`: < 98 %; e.g. the 11616 features after a
   Flatten grouped only by their 24 channels, or a residual stream whose partition four layers must share),
   the layer gathers its input / scatters its output with a runtime `Gather`; the report says where and why.
   Measured (benchmarks/results/blockperm.md): on cifar10_resnet4b the 10 Gathers that `auto` keeps cost ~8 %
   of the cpu target's latency (1.79× instead of 1.95× faster than the original), while forcing every fold
   (`fold=always`) cost 11 points of top-1.
3. **Rewrite**: Conv (any kernel) → a grouped Conv with `group=B`; Gemm/MatMul → [Gather] → the blocks →
   [Gather], the blocks as (`form`) a grouped 1×1 Conv on a [N, n, 1, 1] view, B MatMuls with 2-D weights
   and a Concat, or one batched MatMul with a [B, n/B, m/B] weight between two Reshapes. Which is fastest was
   measured, not assumed: squeeze's CPU schedules pack grouped Convs and 2-D-weight MatMuls but leave the
   batched MatMul unscheduled (5× slower than the dense layer on mnist_burn's fc1), so `form=auto` picks the
   grouped Conv (2-D inputs, blocks of a multiple of 4 outputs) or the split form.
4. **Compensation** (`compensate`, with real calibration data): per block, the kept weights are refit so the
   layer's output on calibration activations (from the already-rewritten network upstream) matches the
   original: each output keeps a free scale on its kept-weight signal plus a ridge correction toward the kept
   weights; no change, scale-only and ridge strengths are compared on held-out images after the next
   nonlinearity.

Selection: by default every Gemm/MatMul/Conv with at least `min_size` parameters; `layers` names layers (always
rewritten), op types or patterns. Sizes not divisible by B (e.g. a 10-class head with B=4) are padded to B·⌈n/B⌉
with zero rows/columns and use a Gather on that side: blocks of 3,3,2,2 real outputs in 4 slots of 3. So on
mnist_burn `blocks=4` rewrites fc1 (11616→32) and leaves fc2 (32→10, 320 parameters < min_size) alone; naming
fc2 in `layers` rewrites it with padded blocks, at a cost of about 1.5 more points of top-1.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Annotated, Hashable, Literal

import numpy as np
import onnx_graphsurgeon as gs

from squeeze.context import Context
from squeeze.threads import single_threaded
from squeeze.errors import PassError
from squeeze.registry import Backoff, Range, register_pass

from . import blockperm_search as bs
from .blockperm_fit import calib_values, compensate_blocks, export, samples_first
from .channel_space import Group
from .coupling import channel_groups
from .cutting import CUTTERS, Cut
from .graph_util import constant_value, infer_shapes
from .graph_util import fresh_name

BLOCK_OPS = ("Gemm", "MatMul", "Conv")
#: fold=auto: a layer whose folded partition keeps less than this fraction of what a free one keeps gets Gathers.
FOLD_RATIO = 0.98
#: Ridge strengths of the compensation, relative to the mean diagonal of XᵀX (besides no change and scale only).
#: Calibration rows per layer for compensation (Conv: sampled im2col positions) and samples for E[x²].
POWER_SAMPLES = 128
_PERMUTED_PORTS = ("in", "out", "dw", "param")  # members whose constants a reordering rewrites
#: What benchmarks/results/blockperm.md measured (batch 1, one thread): the report's target latencies say the rest.
SPEED_NOTE = ("speed (measured in benchmarks/results/blockperm.md, batch 1): with the cpu target's schedules the "
              "block forms ran 0.7-2.4× as fast as the dense layers (median 1.8×; whole models 1.1-1.9×), but "
              "ONNX Runtime ran them 0.26-0.92× as fast: the rewrite pays off on TVM targets, not in ONNX Runtime")
#: Measured slower than the dense layer with the cpu target: the split form, and layers of a few microseconds.
SLOW_FORM_NOTE = ("{layers}: blocks of {outputs} outputs (not a multiple of 4) run as B MatMuls + Concat, which "
                  "the cpu target ran slower than the dense layer in the benchmark (cifar10_resnet4b Gemm_25: "
                  "0.74×); fewer blocks, or B dividing the outputs by a multiple of 4, keep the grouped form")


def weaker_blocks(blocks: int | dict[str, int]) -> int | None:
    """Accuracy guard: halve B down to 2 (a per-layer map is not weakened; the guard skips layers instead)."""
    if isinstance(blocks, int) and blocks // 2 >= 2:
        return blocks // 2
    return None


# ------------------------------------------------------------------------------------------------ data types

@dataclass
class Port:
    """One side of a block layer: `size` features; folded through `group` (each channel owning `inner`
    consecutive features) or, with `group` None, permuted at run time, `why` saying why."""

    size: int
    group: Group | None = None
    inner: int = 1
    why: str = ""


@dataclass
class BlockLayer:
    """A layer to rewrite: the node, its block count, its input/output tensors and both ports."""

    node: gs.Node
    name: str
    blocks: int
    x: gs.Tensor
    y: gs.Tensor                       # the layer's output (a MatMul's bias Add output when absorbed)
    bias_add: gs.Node | None           # a MatMul's bias Add, absorbed into the rewrite
    m: int
    n: int
    kernel: tuple[int, ...]
    rank: int                          # rank of x
    positions: int | None = None       # output positions per sample (Conv: H×W), for MACs
    inp: Port = field(default_factory=lambda: Port(0))
    out: Port = field(default_factory=lambda: Port(0))

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1


@dataclass
class _Reorder(Cut):
    """A `channels.Cut` that keeps every channel but reorders them: `order[new position] = old position`."""

    order: np.ndarray | None = None

    def indices(self) -> np.ndarray:
        return expand_order(self.order, self.inner, self.outer)


def expand_order(order: np.ndarray, inner: int = 1, outer: int = 1) -> np.ndarray:
    """Element order along an axis for a channel order (each channel owns `inner` elements, pattern × `outer`)."""
    width = len(order)
    idx = (np.arange(outer)[:, None, None] * (width * inner) + np.asarray(order)[None, :, None] * inner
           + np.arange(inner)[None, None, :])
    return idx.reshape(-1)


# ---------------------------------------------------------------------------------------------------- pass

@register_pass("blockperm", backoff=Backoff("blocks", weaker_blocks, skip="skip"))
def blockperm(graph: gs.Graph, ctx: Context, *,
              blocks: Annotated[int | dict[str, int], Range(2, 4096),
                                "diagonal blocks B per layer, or a map {layer: B} (only those layers)"] = 4,
              layers: Annotated[list[str], "layers to rewrite: names, op types or patterns; default: every "
                                "Gemm/MatMul/Conv with at least min_size parameters"] = [],  # noqa: B006
              min_size: Annotated[int, Range(0, None), "smallest layer (parameters) the default selection "
                                  "rewrites"] = 4096,
              compensate: Annotated[bool, "refit each block on the calibration data (needs --calib)"] = True,
              search: Annotated[int, Range(0, 64), "permutation search effort: random restarts besides the "
                                "spectral and identity seeds"] = 2,
              fold: Annotated[Literal["auto", "always", "never"], "fold permutations into neighbouring layers "
                              "wherever the channel analysis allows (always), never (runtime Gathers), or unless "
                              "folding keeps < 98% of the energy a free permutation keeps (auto)"] = "auto",
              form: Annotated[Literal["auto", "conv", "split", "matmul"], "how Gemm/MatMul blocks run: a grouped "
                              "1×1 Conv (conv), B MatMuls and a Concat (split), one batched MatMul with a "
                              "[B, n/B, m/B] weight (matmul); auto: conv for 2-D inputs when a block has a "
                              "multiple of 4 outputs, else split"] = "auto",
              skip: Annotated[list[str], "layers left untouched (names, op types, patterns)"]
              = [],  # noqa: B006 (never mutated)
              ) -> None:
    """Block-diagonal layers after permuting rows/columns (MPDCompress): B× fewer weights and MACs per layer."""
    with single_threaded():
        _blockperm(graph, ctx, blocks, layers, min_size, compensate, search, fold, form, skip)


def _blockperm(graph: gs.Graph, ctx: Context, blocks: int | dict[str, int], layers: list[str], min_size: int,
               compensate: bool, search: int, fold: str, form: str, skip: list[str]) -> None:
    targets, skipped = select_targets(graph, ctx, blocks, layers, min_size, skip)
    for name, why in skipped.items():
        if why.startswith("not "):
            ctx.note(f"{name} left unchanged: {why}")
    small = [name for name, why in skipped.items() if why.startswith("below")]
    if small:
        ctx.note(f"{len(small)} layer(s) below min_size={min_size:,} parameters left unchanged: {', '.join(small)}")
    ctx.details["layers"] = []
    ctx.details["layer_table"] = []
    ctx.details["skipped"] = skipped
    if not targets:
        ctx.note("no layer to rewrite")
        return
    real = not ctx.calib_is_synthetic
    power = input_power(ctx, targets) if real else {}
    groups = channel_groups(graph, ctx.input_shapes)
    assign_ports(targets, groups)
    scores = {id(t): layer_score(t, power.get(t.name)) for t in targets}
    solution = choose_partitions(targets, scores, fold, search, ctx.rng)
    if compensate and not real:
        ctx.note("compensation skipped: the calibration data is synthetic (give --calib with real inputs)")
    plan = group_permutations(targets, solution)
    orders = permute_groups(graph, plan)
    reference = export(graph, ctx) if compensate and real else None
    rows = []
    done: list[BlockLayer] = []
    for t in sorted(targets, key=lambda t: graph.nodes.index(t.node)):
        row = rewrite(graph, ctx, t, solution, orders, scores[id(t)], reference, done, form)
        rows.append(row)
        done.append(t)
        ctx.details["layers"].append(t.name)
    ctx.details["layer_table"] = rows
    _summarise(ctx, rows)


# ------------------------------------------------------------------------------------------------ selection

def select_targets(graph: gs.Graph, ctx: Context, blocks: int | dict[str, int], layers: list[str], min_size: int,
                   skip: list[str]) -> tuple[list[BlockLayer], dict[str, str]]:
    """The layers to rewrite (with their B) and {name: why} for layers matched but left alone."""
    _name_unnamed(graph)
    weight_nodes = [n for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    skipped = {n.name: "skip" for n in _matching(weight_nodes, skip, "skip")}
    per_layer: dict[str, int] = {}
    if isinstance(blocks, dict):
        for key, value in blocks.items():
            if int(value) < 2:
                raise PassError(f"blocks={{{key}: {value}}}: a layer needs at least 2 blocks")
            for node in _matching(weight_nodes, [key], "blocks"):
                per_layer.setdefault(node.name, int(value))
    elif blocks < 2:
        raise PassError(f"blocks={blocks}: at least 2 blocks are needed")
    if layers:
        chosen = _matching(weight_nodes, layers, "layers")
        explicit = {n.name for n in weight_nodes if n.name in layers}
    elif isinstance(blocks, dict):
        chosen = [n for n in weight_nodes if n.name in per_layer]
        explicit = set(per_layer)
    else:
        chosen = [n for n in weight_nodes if n.op in BLOCK_OPS]
        explicit = set()
    shapes = infer_shapes(graph, ctx.input_shapes)
    targets = []
    for node in chosen:
        if node.name in skipped:
            continue
        b = per_layer.get(node.name, blocks if isinstance(blocks, int) else None)
        if b is None:
            continue
        weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        params = int(np.asarray(weight).size) if weight is not None else 0
        if node.name not in explicit and params < min_size:
            skipped[node.name] = f"below min_size ({params:,} < {min_size:,} parameters)"
            continue
        target, why = make_target(graph, node, b, shapes)
        if target is None:
            skipped[node.name] = f"not rewritable: {why}"
            continue
        targets.append(target)
    return targets, skipped


def _name_unnamed(graph: gs.Graph) -> None:
    used = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            name, k = f"{node.op}_{i}", 1
            while name in used:
                name, k = f"{node.op}_{i}_{k}", k + 1
            node.name = name
            used.add(name)


def _matching(nodes: list[gs.Node], entries: list[str], what: str) -> list[gs.Node]:
    """Nodes matched by names, op types or fnmatch patterns; PassError for an entry that matches nothing."""
    hits: dict[int, gs.Node] = {}
    for entry in entries:
        found = [n for n in nodes if n.name == entry or n.op == entry or fnmatch.fnmatchcase(n.name, entry)]
        if not found:
            names = ", ".join(n.name for n in nodes[:20]) + (" ..." if len(nodes) > 20 else "")
            raise PassError(f"{what} entry {entry!r} matches no layer; layers are: {names}")
        hits.update((id(n), n) for n in found)
    return [n for n in nodes if id(n) in hits]


def make_target(graph: gs.Graph, node: gs.Node, blocks: int, shapes: dict) -> tuple[BlockLayer | None, str]:
    """A BlockLayer for `node`, or (None, why it cannot be rewritten)."""
    x = node.inputs[0]
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or not np.issubdtype(np.asarray(w).dtype, np.floating):
        return None, "its weight is not a float constant"
    if not np.isfinite(w).all():
        return None, "its weight holds NaN or infinity"
    rank = len(shapes[x.name]) if shapes.get(x.name) is not None else None
    bias_add, y = None, node.outputs[0]
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return None, f"already a grouped convolution (group={node.attrs.get('group')})"
        if w.ndim < 3:
            return None, "unexpected Conv weight rank"
        m, n, kernel = int(w.shape[0]), int(w.shape[1]), tuple(int(k) for k in w.shape[2:])
        if len(node.inputs) > 2 and node.inputs[2].name and constant_value(node.inputs[2]) is None:
            return None, "its bias is not constant"
        rank = rank or w.ndim
    elif node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None, "transA=1"
        if w.ndim != 2:
            return None, "B is not a matrix"
        trans_b = int(node.attrs.get("transB", 0))
        n, m = (int(w.shape[1]), int(w.shape[0])) if trans_b else (int(w.shape[0]), int(w.shape[1]))
        kernel, rank = (), 2
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = constant_value(node.inputs[2])
            if c is None or c.size not in (1, m) or (c.ndim == 2 and c.shape[0] != 1):
                return None, "its C is not a constant per-output bias"
    elif node.op == "MatMul":
        if w.ndim != 2:
            return None, "its weight is not a constant matrix"
        if constant_value(x) is not None:
            return None, "its left operand is constant"
        if rank is None or rank < 2:
            return None, "the rank of its input is unknown"
        n, m, kernel = int(w.shape[0]), int(w.shape[1]), ()
        consumers = y.outputs
        if len(consumers) == 1 and consumers[0].op == "Add" and y not in graph.outputs:
            add = consumers[0]
            other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            c = constant_value(other)
            if c is not None and c.size in (1, m) and (c.ndim == 0 or c.shape[-1] == c.size) and c.ndim <= rank:
                bias_add, y = add, add.outputs[0]
    else:
        return None, f"{node.op} is not supported"
    if m < blocks or n < blocks:
        return None, f"{m}×{n} is too small for {blocks} blocks"
    out_shape = shapes.get(node.outputs[0].name)
    positions = None
    if out_shape is not None and all(isinstance(d, int) for d in out_shape) and out_shape:
        positions = int(np.prod(out_shape)) // m
    return BlockLayer(node, node.name, blocks, x, y, bias_add, m, n, kernel, rank, positions), ""


# ------------------------------------------------------------------------------------------------- weights

def weights(t: BlockLayer) -> tuple[np.ndarray, np.ndarray]:
    """The layer as (W [m, n, *kernel], bias [m]) in float64, Gemm's alpha/beta applied, current constants."""
    node = t.node
    w = np.asarray(constant_value(node.inputs[1]), dtype=np.float64)
    if node.op == "Conv":
        b = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        bias = np.zeros(t.m) if b is None else np.asarray(b, np.float64).reshape(-1)
        return w, bias
    if node.op == "Gemm":
        mat = (w if node.attrs.get("transB", 0) else w.T) * float(node.attrs.get("alpha", 1.0))
        c = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        bias = np.zeros(t.m) if c is None else np.broadcast_to(
            np.asarray(c, np.float64).reshape(-1) * float(node.attrs.get("beta", 1.0)), (t.m,)).copy()
        return mat, bias
    bias = np.zeros(t.m)
    if t.bias_add is not None:
        add = t.bias_add
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        bias = np.broadcast_to(np.asarray(constant_value(other), np.float64).reshape(-1), (t.m,)).copy()
    return w.T, bias


def input_power(ctx: Context, targets: list[BlockLayer]) -> dict[str, np.ndarray]:
    """E[x²] per input feature (Gemm/MatMul) or channel (Conv) of every target, on calibration samples."""
    data = ctx.calib.subset(0, min(len(ctx.calib), POWER_SAMPLES))
    values = calib_values(ctx.model, data, sorted({t.x.name for t in targets}), ctx.threads)
    power = {}
    for t in targets:
        x = samples_first(values[t.x.name], t.rank).astype(np.float64)
        if t.op == "Conv":
            x = np.moveaxis(x, 1, -1)
        power[t.name] = (x.reshape(-1, t.n) ** 2).mean(axis=0)
    return power


def layer_score(t: BlockLayer, power: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per (output, input feature): energy Σw² over the kernel, and the score (× E[x²] with calibration data)."""
    w, _ = weights(t)
    energy = (w ** 2).reshape(t.m, t.n, -1).sum(axis=-1)
    usable = power is not None and power.size == t.n and np.isfinite(power).all() and power.sum() > 0
    score = energy * power[None, :] if usable else energy
    return {"energy": energy, "score": score}


# ---------------------------------------------------------------------------------------------------- ports

def assign_ports(targets: list[BlockLayer], groups: list[Group]) -> None:
    """Each target's input and output port: the channel group a permutation can be folded through, or why not."""
    by_node = {id(t.node): t for t in targets}
    for t in targets:
        t.inp, t.out = Port(t.n, why="the channel analysis does not trace it"), Port(
            t.m, why="the channel analysis does not trace it")
    for g in groups:
        reason = _unfoldable(g)
        for member in g.members:
            t = by_node.get(id(member.node))
            if t is None or member.port not in ("in", "out"):
                continue
            port = t.inp if member.port == "in" else t.out
            s = member.slot
            why = reason
            if why is None and (s.offset != 0 or s.width != g.size):
                why = f"'{s.tensor}' also carries other channels (a Concat)"
            if why is None and s.outer != 1:
                why = f"the channels of '{s.tensor}' are interleaved with other axes (channels-last flatten)"
            if why is None and t.op == "Conv" and s.inner != 1:
                why = "unexpected channel layout"
            if why is None and g.size % t.blocks:
                why = f"{g.size} channels are not divisible by {t.blocks} blocks"
            if why is None and g.size * s.inner != port.size:
                why = "the channels do not cover the layer's features"
            if why is None:
                port.group, port.inner, port.why = g, s.inner, ""
            else:
                port.why = why
    # Layers sharing a group must share B.
    owners: dict[int, set[int]] = {}
    for t in targets:
        for port in (t.inp, t.out):
            if port.group is not None:
                owners.setdefault(port.group.index, set()).add(t.blocks)
    for t in targets:
        for port in (t.inp, t.out):
            if port.group is not None and len(owners[port.group.index]) > 1:
                port.group, port.inner, port.why = None, 1, "layers with different block counts share these channels"


def _unfoldable(group: Group) -> str | None:
    """Why the channels of `group` cannot be reordered in place (None if they can)."""
    if group.reasons:
        return group.reasons[0]
    if group.parts:
        return "a Split/Slice takes part of these channels"
    for m in group.members:
        if m.port not in _PERMUTED_PORTS + ("pass", "reshape", "resize"):
            return f"{m.op} '{m.label}' would need its sizes rewritten"
        if m.port in _PERMUTED_PORTS and m.op not in CUTTERS:
            return f"no rule to reorder {m.op} '{m.label}'"
    for s in group.slots:
        if s.start != 0 or s.length != group.size:
            return f"'{s.tensor}' holds only part of these channels"
    return None


# --------------------------------------------------------------------------------------------------- search

def _var(t: BlockLayer, side: str) -> Hashable:
    port = t.inp if side == "in" else t.out
    return ("group", port.group.index) if port.group is not None else ("own", t.name, side)


def _var_size(t: BlockLayer, side: str) -> int:
    port = t.inp if side == "in" else t.out
    return port.group.size if port.group is not None else port.size


def _search_score(t: BlockLayer, score: np.ndarray) -> np.ndarray:
    """The layer's score on the items of its partitions (a folded input sums each channel's features)."""
    if t.inp.group is not None and t.inp.inner > 1:
        return score.reshape(t.m, t.inp.group.size, t.inp.inner).sum(axis=-1)
    return score


@dataclass
class Partitions:
    """Labels per partition variable, the kept (search-score) fraction per target, and what a free
    (unfolded) search keeps per target."""

    labels: dict[Hashable, np.ndarray]
    kept: dict[str, float]
    free: dict[str, float]
    seeds: dict[str, str]


def _solve(targets: list[BlockLayer], scores: dict, restarts: int, rng: np.random.Generator, cache: dict
           ) -> tuple[dict[Hashable, np.ndarray], dict[str, float], dict[str, str]]:
    """Solve every connected component (targets linked by shared partitions) of the current port assignment."""
    parent = list(range(len(targets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[Hashable, int] = {}
    for i, t in enumerate(targets):
        for side in ("in", "out"):
            v = _var(t, side)
            if v in seen:
                parent[find(i)] = find(seen[v])
            seen[v] = i
    components: dict[int, list[int]] = {}
    for i in range(len(targets)):
        components.setdefault(find(i), []).append(i)
    # a partition only one layer side uses (at feature granularity) is as free as a private one: same search
    uses: dict[Hashable, int] = {}
    for t in targets:
        for side in ("in", "out"):
            uses[_var(t, side)] = uses.get(_var(t, side), 0) + 1

    def alias(t: BlockLayer, side: str) -> Hashable:
        v = _var(t, side)
        port = t.inp if side == "in" else t.out
        return ("own", t.name, side) if uses[v] == 1 and port.inner == 1 else v

    labels: dict[Hashable, np.ndarray] = {}
    kept: dict[str, float] = {}
    seeds: dict[str, str] = {}
    for members in components.values():
        key = tuple((targets[i].name, alias(targets[i], "out"), alias(targets[i], "in")) for i in members)
        if key not in cache:
            blocks = targets[members[0]].blocks
            layer_scores = [bs.LayerScore(_search_score(targets[i], scores[id(targets[i])]["score"]),
                                          alias(targets[i], "out"), alias(targets[i], "in")) for i in members]
            sizes = {}
            for i in members:
                for side in ("out", "in"):
                    sizes[alias(targets[i], side)] = _var_size(targets[i], side)
            cache[key] = bs.search(layer_scores, sizes, blocks, restarts, rng)
        sol = cache[key]
        for i in members:
            for side in ("out", "in"):
                labels[_var(targets[i], side)] = sol.labels[alias(targets[i], side)]
        for i, k in zip(members, sol.kept):
            kept[targets[i].name] = k
            seeds[targets[i].name] = sol.seed
    return labels, kept, seeds


def choose_partitions(targets: list[BlockLayer], scores: dict, fold: str, restarts: int,
                      rng: np.random.Generator) -> Partitions:
    """Search the partitions; with fold=auto, unfold the ports of layers that folding costs too much energy."""
    cache: dict = {}

    def set_ports(t: BlockLayer, inp: bool, out: bool, why: str) -> None:
        if not inp and t.inp.group is not None:
            t.inp.group, t.inp.inner, t.inp.why = None, 1, why
        if not out and t.out.group is not None:
            t.out.group, t.out.inner, t.out.why = None, 1, why

    # What each layer keeps with free (runtime-gathered) permutations on both sides.
    saved = [(t.inp.group, t.inp.inner, t.inp.why, t.out.group, t.out.inner, t.out.why) for t in targets]
    for t in targets:
        set_ports(t, False, False, "fold=never")
    _, free, _ = _solve(targets, scores, restarts, rng, cache)
    for t, s in zip(targets, saved):
        t.inp.group, t.inp.inner, t.inp.why, t.out.group, t.out.inner, t.out.why = s
    if fold == "never":
        for t in targets:
            set_ports(t, False, False, "fold=never")
    labels, kept, seeds = _solve(targets, scores, restarts, rng, cache)
    if fold == "auto":
        done: set[str] = set()
        while True:
            worst = [t for t in targets if t.name not in done and (t.inp.group is not None or t.out.group is not None)
                     and kept[t.name] < FOLD_RATIO * free[t.name]]
            if not worst:
                break
            t = min(worst, key=lambda t: kept[t.name] / max(free[t.name], 1e-30))
            done.add(t.name)
            why = "folded, the partition would keep {kept:.1%} of the score, a free one {free:.1%}"
            before = (t.inp.group, t.inp.inner, t.out.group, t.out.inner)
            trials = []
            for inp, out in ((False, True), (True, False), (False, False)):
                if (not inp and before[0] is None) or (not out and before[2] is None):
                    continue
                t.inp.group, t.inp.inner, t.out.group, t.out.inner = before
                set_ports(t, inp, out, "")
                result = _solve(targets, scores, restarts, rng, cache)
                # enough energy first, then as few runtime Gathers as possible, then the most energy overall
                trials.append((result[1][t.name] >= FOLD_RATIO * free[t.name], inp + out, sum(result[1].values()),
                               inp, out, result))
            trials.sort(key=lambda r: r[:3], reverse=True)
            *_, inp, out, (labels, kept_new, seeds) = trials[0]
            t.inp.group, t.inp.inner, t.out.group, t.out.inner = before
            text = why.format(free=free[t.name], kept=kept[t.name])
            set_ports(t, inp, out, text)
            kept = kept_new
    return Partitions(labels, kept, free, seeds)


# ---------------------------------------------------------------------------------------------------- fold

def group_permutations(targets: list[BlockLayer], solution: Partitions) -> dict[Group, np.ndarray]:
    """For every folded group: the channel order that puts cluster 0 first, then cluster 1, ... (new → old)."""
    plan: dict[Group, np.ndarray] = {}
    for t in targets:
        for port in (t.inp, t.out):
            if port.group is not None and port.group not in plan:
                labels = solution.labels[("group", port.group.index)][:port.group.size]
                plan[port.group] = np.argsort(labels, kind="stable")
    return plan


def permute_groups(graph: gs.Graph, plan: dict[Group, np.ndarray]) -> dict[tuple[int, str, str], np.ndarray]:
    """Reorder the channels of every group in `plan` in all its members (lossless). Returns the element order
    (new → old) applied along the channel axis of each (node, port, tensor)."""
    orders: dict[tuple[int, str, str], np.ndarray] = {}
    members = {}
    for group, perm in plan.items():
        for m in group.members:
            s = m.slot
            key = (id(m.node), m.port, s.tensor)
            if key not in orders:
                orders[key] = np.arange(s.width)
                members[key] = m
            orders[key][s.offset:s.offset + s.length] = s.offset + perm
    elements = {}
    for key, order in orders.items():
        m = members[key]
        s = m.slot
        if m.port in _PERMUTED_PORTS:
            CUTTERS[m.node.op](graph, _Reorder(m.node, m.port, s.tensor, s.axis, s.inner, s.outer,
                                               np.ones(s.width, bool), s.rank, order=order))
        elements[key] = expand_order(order, s.inner, s.outer)
    return elements


def _positions(t: BlockLayer, side: str, solution: Partitions, orders: dict) -> np.ndarray:
    """[B, width] current feature positions of each block on one side of the layer (-1: a padding slot)."""
    port = t.inp if side == "in" else t.out
    size = port.size
    tensor = t.x.name if side == "in" else t.node.outputs[0].name
    order = orders.get((id(t.node), side, tensor))
    order = np.arange(size) if order is None else order
    labels = solution.labels[_var(t, side)]
    item = np.arange(size) // port.inner if port.group is not None else np.arange(size)
    feature_labels = labels[item][order]  # label of the feature now at each position
    blocks = t.blocks
    width = bs.padded(len(labels), blocks) // blocks * port.inner
    pos = np.full((blocks, width), -1, dtype=np.int64)
    for g in range(blocks):
        where = np.flatnonzero(feature_labels == g)
        pos[g, :len(where)] = where
    return pos


# ------------------------------------------------------------------------------------------------- rewrite

def rewrite(graph: gs.Graph, ctx: Context, t: BlockLayer, solution: Partitions, orders: dict, score: dict,
            reference, done: list[BlockLayer], form: str = "auto") -> dict:
    """Replace one layer by its block form (compensated when `reference` is given); its report row."""
    w, bias = weights(t)
    pin, pout = _positions(t, "in", solution, orders), _positions(t, "out", solution, orders)
    B, wi, wo = t.blocks, pin.shape[1], pout.shape[1]
    blocks = np.zeros((B, wo, wi) + t.kernel)
    block_bias = np.zeros((B, wo))
    for g in range(B):
        ri, ro = pin[g] >= 0, pout[g] >= 0
        blocks[g][np.ix_(ro, ri)] = w[np.ix_(pout[g][ro], pin[g][ri])]
        block_bias[g][ro] = bias[pout[g][ro]]
    row = _row(t, score, solution, pin, pout, orders)
    if reference is not None:
        blocks, block_bias, info = compensate_blocks(graph, ctx, t, reference, done, blocks, block_bias, pin, pout)
        row["compensation"] = info
    gather_in = not _contiguous(pin)
    gather_out = not _contiguous(pout)
    dtype = np.asarray(constant_value(t.node.inputs[1])).dtype
    lowering = "conv" if t.op == "Conv" else lowering_for(t, wo, form)
    _build(graph, t, blocks.astype(dtype), block_bias.astype(dtype), pin if gather_in else None,
           pout if gather_out else None, lowering)
    row["params_after"] = int(blocks.size)
    row["form"] = {"conv": f"grouped Conv (group={B})", "split": f"{B} MatMuls + Concat",
                   "matmul": "batched MatMul"}[lowering]
    row["runtime_gather"] = [f"{side} ({port.why})" for side, port, flag in
                             (("input", t.inp, gather_in), ("output", t.out, gather_out)) if flag]
    return row


def lowering_for(t: BlockLayer, block_outputs: int, form: str) -> str:
    """How a Gemm/MatMul's blocks run. Measured (benchmarks/results/blockperm.md): squeeze's CPU schedules pack
    a grouped Conv whose groups have a multiple of 4 outputs and every 2-D-weight MatMul, but run a batched
    MatMul with a 3-D weight unscheduled (5× slower than the dense layer on mnist_burn's fc1)."""
    if form != "auto":
        return "split" if form == "conv" and t.rank != 2 else form
    return "conv" if t.rank == 2 and block_outputs % 4 == 0 else "split"


def _contiguous(pos: np.ndarray) -> bool:
    return bool((pos.reshape(-1) == np.arange(pos.size)).all())


def _build(graph: gs.Graph, t: BlockLayer, blocks: np.ndarray, bias: np.ndarray, pin: np.ndarray | None,
           pout: np.ndarray | None, lowering: str) -> None:
    """Insert the block form of `t` between its input and its output tensor, and disconnect the old node(s).

    blocks [B, m/B, n/B, *kernel], bias [B, m/B]; `lowering` (Gemm/MatMul): conv | split | matmul.
    """
    name = t.name
    node, y = t.node, t.y
    B, wo, wi = blocks.shape[:3]
    axis = 1 if t.op == "Conv" else t.rank - 1
    x = t.x
    if pin is not None:
        x = _gather(graph, x, np.where(pin >= 0, pin, 0).reshape(-1), axis, f"{name}/blockperm_in")
    out_var = gs.Variable(fresh_name(graph, f"{name}/blocks_out"), dtype=y.dtype)
    for old in [node] + ([t.bias_add] if t.bias_add is not None else []):
        old.name = old.name + "/replaced"
        old.outputs.clear()
    flat_bias = gs.Constant(fresh_name(graph, f"{name}.block_bias"), np.ascontiguousarray(bias.reshape(-1)))
    if t.op == "Conv" or lowering == "conv":
        kernel = blocks.shape[3:] or (1, 1)
        attrs = dict(node.attrs) if t.op == "Conv" else {"kernel_shape": [1, 1]}
        attrs["group"] = B
        weight = gs.Constant(fresh_name(graph, f"{name}.block_weight"),
                             np.ascontiguousarray(blocks.reshape((B * wo, wi) + tuple(kernel))))
        if t.op == "Conv":
            graph.nodes.append(gs.Node("Conv", name, attrs, [x, weight, flat_bias], [out_var]))
        else:  # a block-diagonal matrix product is a grouped 1×1 convolution on a [N, n, 1, 1] view
            image = _reshape(graph, x, [0, B * wi, 1, 1], f"{name}/blockperm_image")
            product = gs.Variable(fresh_name(graph, f"{name}/blocks_product"), dtype=y.dtype)
            graph.nodes.append(gs.Node("Conv", name, attrs, [image, weight, flat_bias], [product]))
            graph.nodes.append(_reshape_node(graph, product, [0, B * wo], f"{name}/blockperm_flat", out_var))
    elif lowering == "split":
        parts = [gs.Variable(fresh_name(graph, f"{name}/part{g}"), dtype=y.dtype) for g in range(B)]
        graph.nodes.append(_split_node(graph, x, parts, axis, [wi] * B, f"{name}/blockperm_split"))
        products = []
        for g in range(B):
            w = gs.Constant(fresh_name(graph, f"{name}.block_weight{g}"), np.ascontiguousarray(blocks[g].T))
            products.append(gs.Variable(fresh_name(graph, f"{name}/block{g}"), dtype=y.dtype))
            graph.nodes.append(gs.Node("MatMul", f"{name}/block{g}", {}, [parts[g], w], [products[g]]))
        merged = gs.Variable(fresh_name(graph, f"{name}/blocks_concat"), dtype=y.dtype)
        graph.nodes.append(gs.Node("Concat", name, {"axis": axis}, products, [merged]))
        graph.nodes.append(gs.Node("Add", f"{name}/blockperm_bias", {}, [merged, flat_bias], [out_var]))
    else:
        lead = [0] * (t.rank - 1)
        grouped = _reshape(graph, x, lead + [B, 1, wi], f"{name}/blockperm_split")
        weight = gs.Constant(fresh_name(graph, f"{name}.block_weight"),
                             np.ascontiguousarray(blocks.transpose(0, 2, 1)))  # [B, n/B, m/B]
        product = gs.Variable(fresh_name(graph, f"{name}/blocks_product"), dtype=y.dtype)
        graph.nodes.append(gs.Node("MatMul", name, {}, [grouped, weight], [product]))
        merged = _reshape(graph, product, lead + [B * wo], f"{name}/blockperm_merge")
        graph.nodes.append(gs.Node("Add", f"{name}/blockperm_bias", {}, [merged, flat_bias], [out_var]))
    if pout is not None:
        slots = np.full(t.m, -1, dtype=np.int64)
        valid = pout.reshape(-1) >= 0
        slots[pout.reshape(-1)[valid]] = np.flatnonzero(valid)
        _gather(graph, out_var, slots, axis, f"{name}/blockperm_out")
    # the last node writes the original output tensor, so every consumer (and a graph output) is unchanged
    graph.nodes[-1].outputs[0] = y


def _split_node(graph: gs.Graph, x: gs.Tensor, parts: list[gs.Variable], axis: int, sizes: list[int],
                name: str) -> gs.Node:
    """Split with explicit sizes: an input from opset 13, an attribute before."""
    if int(graph.opset or 13) >= 13:
        sizes_t = gs.Constant(fresh_name(graph, f"{name}_sizes"), np.array(sizes, dtype=np.int64))
        return gs.Node("Split", name, {"axis": axis}, [x, sizes_t], parts)
    return gs.Node("Split", name, {"axis": axis, "split": list(sizes)}, [x], parts)


def _reshape_node(graph: gs.Graph, x: gs.Tensor, shape: list[int], name: str, out: gs.Variable) -> gs.Node:
    target = gs.Constant(fresh_name(graph, f"{name}_shape"), np.array(shape, dtype=np.int64))
    return gs.Node("Reshape", name, {}, [x, target], [out])


def _gather(graph: gs.Graph, x: gs.Tensor, indices: np.ndarray, axis: int, name: str) -> gs.Variable:
    out = gs.Variable(fresh_name(graph, name), dtype=x.dtype)
    idx = gs.Constant(fresh_name(graph, f"{name}_indices"), indices.astype(np.int64))
    graph.nodes.append(gs.Node("Gather", name, {"axis": int(axis)}, [x, idx], [out]))
    return out


def _reshape(graph: gs.Graph, x: gs.Tensor, shape: list[int], name: str) -> gs.Variable:
    out = gs.Variable(fresh_name(graph, name), dtype=x.dtype)
    graph.nodes.append(_reshape_node(graph, x, shape, name, out))
    return out


# -------------------------------------------------------------------------------------------------- report

def _row(t: BlockLayer, score: dict, solution: Partitions, pin: np.ndarray, pout: np.ndarray, orders: dict) -> dict:
    """The report row of one layer (kept energy vs identity and random partitions, sizes, MACs)."""
    energy, weighted = score["energy"], score["score"]
    B = t.blocks
    rows_now, cols_now = _current_labels(pout, t.m), _current_labels(pin, t.n)
    out_order = orders.get((id(t.node), "out", t.node.outputs[0].name), np.arange(t.m))
    in_order = orders.get((id(t.node), "in", t.x.name), np.arange(t.n))
    # labels of the original features: position p holds original feature order[p]
    r = np.empty(t.m, np.int64)
    c = np.empty(t.n, np.int64)
    r[out_order], c[in_order] = rows_now, cols_now
    rng = np.random.default_rng(0)
    ident = (bs.identity_labels(t.m, B), bs.identity_labels(t.n, B))
    rand = (bs.random_labels(t.m, B, rng), bs.random_labels(t.n, B, rng))
    wi, wo = pin.shape[1], pout.shape[1]
    row = {
        "layer": t.name, "op": t.op, "blocks": B,
        "shape": [t.m, t.n] + list(t.kernel), "block_shape": [wo, wi] + list(t.kernel),
        "params_before": int(t.m * t.n * t.kernel_size),
        "kept_energy": round(bs.kept_fraction(energy, r, c), 6),
        "kept_energy_identity": round(bs.kept_fraction(energy, *ident), 6),
        "kept_energy_random": round(bs.kept_fraction(energy, *rand), 6),
    }
    if weighted is not energy:
        row["kept_weighted"] = round(bs.kept_fraction(weighted, r, c), 6)
        row["kept_weighted_free"] = round(solution.free.get(t.name, float("nan")), 6)
    row["seed"] = solution.seeds.get(t.name, "")
    row["folded"] = [side for side, port in (("input", t.inp), ("output", t.out)) if port.group is not None]
    if t.positions is not None:
        row["macs_before"] = int(t.positions * t.m * t.n * t.kernel_size)
        row["macs_after"] = int(t.positions * B * wo * wi * t.kernel_size)
    return row


def _current_labels(pos: np.ndarray, size: int) -> np.ndarray:
    labels = np.empty(size, np.int64)
    for g in range(len(pos)):
        valid = pos[g][pos[g] >= 0]
        labels[valid] = g
    return labels


def _summarise(ctx: Context, rows: list[dict]) -> None:
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    for r in rows:
        kept = f"kept energy {r['kept_energy']:.1%} (identity {r['kept_energy_identity']:.1%}, random " \
               f"{r['kept_energy_random']:.1%})"
        where = "; runtime Gather: " + ", ".join(r["runtime_gather"]) if r["runtime_gather"] else \
            "; permutations folded into neighbours"
        comp = f"; compensation {r['compensation']['method']}" if "compensation" in r else ""
        ctx.note(f"{r['layer']}: {r['blocks']} blocks {r['block_shape']}, params {r['params_before']:,} → "
                 f"{r['params_after']:,}, {kept}{where}{comp}")
    ctx.note(f"rewritten layers: {before:,} → {after:,} parameters ({before / max(after, 1):.2f}×)")
    ctx.details["params"] = {"before": before, "after": after}
    split = [r for r in rows if r.get("form", "").endswith("Concat")]
    if split:
        ctx.note(SLOW_FORM_NOTE.format(layers=", ".join(r["layer"] for r in split),
                                       outputs="/".join(sorted({str(r["block_shape"][0]) for r in split}))))
    if any(r["runtime_gather"] for r in rows):
        ctx.note("runtime Gathers cost time: ONNX Runtime copies them element by element (about 8 ns per "
                 "element measured); on the cpu target cifar10_resnet4b's 10 Gathers took ~8 % of its latency; "
                 "fold=always avoids them at some accuracy")
    ctx.note(SPEED_NOTE)
