"""Channel dependency analysis and physical channel removal, shared by the channel passes (`prune`, `slim`).

Three questions, three parts of this module (after Torch-Pruning, Fang et al. 2023, "DepGraph"):

- **Which channels are coupled** — `channel_groups(graph)`. Every Conv/ConvTranspose/Gemm/MatMul output opens a
  *channel space*; a rule per op type (`RULES`, a plain dict) says how a tensor's channels flow through the op:
  the same index for BN/ReLU/pooling, offsets for Concat/Split/Slice, H×W-expansion for Flatten/Reshape, a moved
  axis for Transpose. An elementwise op between two traced tensors (a residual Add) joins their spaces into one
  *group*. Whatever the analysis cannot prove safe (an op without a rule, a graph output, a Shape that reads the
  channel count, a non-constant weight) blocks the group, and the reason is kept.
- **How to cut one op** — `CUTTERS`, one small function per op type, applied by `remove_channels` /
  `apply_plan`, the only functions here that modify a graph. Weights, biases, BN statistics, Split sizes, Slice
  bounds and Reshape targets shrink; no mask or zeroed channel is left behind.
- **Which channels to cut** is the passes' business (importance functions in `prune.py`, `slim.py`); the shared
  planning step that turns scores into kept channels (`plan_removal`) lives here.

A group's channel `c` is the same channel in every member; a member says where the group's channels sit in one
tensor: along `axis`, at `offset` in that axis' channel positions, each position owning `inner` consecutive
elements, the whole pattern repeated `outer` times (a flattened NCHW tensor has inner = H×W; a flattened NHWC one
has outer = H×W).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from squeeze.model import export_without_weights

from .graph_util import fresh_name
from .weights import compressed_cut_problem, compressed_value, replace_compressed, take_compressed

# ------------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class Segment:
    """`length` channels of channel space `space`, starting at its channel `start`."""

    space: int
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    """Where a tensor's traced channels are: which axis, which spaces in which order, and their element pattern."""

    axis: int
    segments: tuple[Segment, ...]
    inner: int = 1
    outer: int = 1

    @property
    def width(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def extent(self) -> int:
        """Size of the tensor along `axis`."""
        return self.outer * self.width * self.inner


@dataclass(frozen=True)
class Slot:
    """Where a group's channels [start, start+length) sit in one tensor (see the module docstring)."""

    tensor: str
    axis: int
    offset: int
    width: int
    inner: int
    outer: int
    start: int
    length: int
    rank: int | None = None


@dataclass(eq=False)
class Member:
    """One node touched by a group. `port` says what cutting does to it:

    `out` (its weights write the channels: cut filters), `in` (its weights read them: cut input channels),
    `dw` (depthwise: a filter per channel, cut filters and `group`), `param` (per-channel constants: BN statistics,
    PRelu slope, a broadcast Add/Mul constant), `split`/`slice`/`reshape`/`resize` (sizes to rewrite), `pass`
    (nothing to change: activations, pooling, Concat, a residual Add of two traced tensors, ...).
    """

    node: gs.Node
    port: str
    slot: Slot
    label: str
    macs: int = 0

    @property
    def op(self) -> str:
        return self.node.op


@dataclass(eq=False)
class Group:
    """Channels that must be removed together. `reasons` is empty when the group may be pruned."""

    index: int
    size: int
    members: list[Member]
    slots: list[Slot]
    reasons: list[str]
    parts: list[tuple[int, int]] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def with_port(self, *ports: str) -> list[Member]:
        return [m for m in self.members if m.port in ports]

    @property
    def producers(self) -> list[Member]:
        return self.with_port("out")

    @property
    def consumers(self) -> list[Member]:
        return self.with_port("in")

    @property
    def name(self) -> str:
        """A readable, stable name: the nodes that write the group (or its first member)."""
        writers = [m.label for m in self.producers] or [m.label for m in self.members[:1]] or [f"group {self.index}"]
        return "+".join(dict.fromkeys(writers))

    def macs_removed(self, removed: int) -> int:
        """MACs this group's removal saves on its own (each Conv/Gemm it touches loses `removed`/width of its MACs)."""
        total = 0.0
        for m in self.with_port("in", "out", "dw"):
            if m.macs and m.slot.width:
                total += m.macs * min(removed, m.slot.length) / m.slot.width
        return int(total)


# ----------------------------------------------------------------------------------------------- helpers


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer, or the output of a Constant node), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            return attrs["value"].values
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in attrs:
                return np.array(attrs[key], dtype=dtype)
    return None


def constant_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of a constant tensor without loading its values (a large initializer stays on its proto)."""
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.shape)
    value = constant_value(tensor)
    return None if value is None else tuple(value.shape)


def weight_value(tensor: gs.Tensor) -> np.ndarray | None:
    """A weight's float values: a constant, or a weight that `codebook` or `quant` rebuilds in the graph from
    compressed storage (decompressed here; the cutters keep it compressed); None for anything else."""
    value = constant_value(tensor)
    return value if value is not None else _decompressed(tensor)


def weight_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of a constant or compressed weight (None when the tensor is neither)."""
    shape = constant_shape(tensor)
    if shape is not None:
        return shape
    value = _decompressed(tensor)
    return None if value is None else tuple(value.shape)


def _decompressed(tensor: gs.Tensor) -> np.ndarray | None:
    """`compressed_value`, or None where a subgraph only looks like a weight rebuild (the analysis is best effort:
    such a weight blocks its groups as any computed weight does)."""
    try:
        return compressed_value(tensor)
    except (ValueError, IndexError, TypeError, KeyError):
        return None


def _cut_problem(node: gs.Node, cuts: Sequence[tuple[int, int]], where: str) -> str | None:
    """Why the compressed weight or bias of `node` cannot be cut (each (input index, axis) in `cuts`), if so."""
    for index, axis in cuts:
        t = _input(node, index)
        problem = compressed_cut_problem(t, axis) if t is not None else None
        if problem:
            what = "weight" if index == 1 else "bias" if index == 2 else f"input {index}"
            return f"{where} has a compressed {what} that cannot be cut along axis {axis}: {problem}"
    return None


def _is_empty(tensor: gs.Tensor | None) -> bool:
    return tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name)


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and not _is_empty(node.inputs[index]) else None


def _prod(values: Iterable[int]) -> int:
    return int(np.prod(list(values), dtype=np.int64))


def expand(mask: np.ndarray, inner: int = 1, outer: int = 1) -> np.ndarray:
    """Element indices along an axis for the channel positions where `mask` is True (see `Slot`)."""
    width = len(mask)
    pos = np.flatnonzero(mask)
    idx = (np.arange(outer)[:, None, None] * (width * inner) + pos[None, :, None] * inner
           + np.arange(inner)[None, None, :])
    return idx.reshape(-1)


def node_labels(graph: gs.Graph) -> dict[int, str]:
    """A printable name per node (by id): its name, or op#index for unnamed nodes."""
    return {id(n): n.name or f"{n.op}#{i}" for i, n in enumerate(graph.nodes)}


def infer_shapes(graph: gs.Graph, input_shapes: Mapping[str, Sequence[int]] | None = None
                 ) -> dict[str, tuple[int | None, ...]]:
    """Shape of every tensor (ONNX shape inference; dynamic leading batch dimensions are taken as 1).

    Inference runs on the graph exported without the bytes of its large weights (their type and dims only), so it
    works on models over the 2 GB protobuf limit and copies no weight.
    """
    model = export_without_weights(graph)
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        given = (input_shapes or {}).get(value.name)
        for i, d in enumerate(dims):
            if given is not None and i < len(given):
                d.Clear()
                d.dim_value = int(given[i])
            elif i == 0 and not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # best effort: a missing shape blocks only the groups that need it
        inferred = model
    shapes: dict[str, tuple[int | None, ...]] = {}
    g = inferred.graph
    for value in list(g.input) + list(g.value_info) + list(g.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                                       for d in value.type.tensor_type.shape.dim)
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant):
            shapes[name] = constant_shape(tensor)
        elif name not in shapes and constant_value(tensor) is not None:
            shapes[name] = tuple(constant_value(tensor).shape)
    return shapes


# ------------------------------------------------------------------------------------------------ analysis


class _Analysis:
    """Propagation state: channel spaces (union-find), each tensor's layout, members, and blocking reasons."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int | None, ...]]):
        self.graph = graph
        self.shapes = shapes
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.layouts: dict[str, Layout] = {}
        self.members: list[tuple[int, Member]] = []
        self.slots: list[tuple[int, Slot]] = []
        self.parts: list[tuple[int, int, int]] = []
        self.labels: dict[int, str] = node_labels(graph)
        self.inputs = {t.name for t in graph.inputs}

    # spaces
    def new_space(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(int(size))
        if reason:
            self.reasons.setdefault(len(self.parent) - 1, []).append(reason)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            for seg in layout.segments:
                self.reasons.setdefault(seg.space, []).append(reason)

    # tensors
    def label(self, node: gs.Node) -> str:
        return self.labels.get(id(node), node.name or node.op)

    def shape(self, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
        shape = constant_shape(tensor)
        return shape if shape is not None else self.shapes.get(tensor.name)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dims(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        shape = self.shape(tensor)
        return None if shape is None or any(d is None for d in shape) else tuple(int(d) for d in shape)

    def layout(self, tensor: gs.Tensor) -> Layout | None:
        return None if _is_empty(tensor) else self.layouts.get(tensor.name)

    def set_layout(self, tensor: gs.Tensor, layout: Layout | None) -> None:
        if layout is None or not layout.segments:
            return
        self.layouts[tensor.name] = layout
        offset = 0
        for seg in layout.segments:
            self.slots.append((seg.space, Slot(tensor.name, layout.axis, offset, layout.width, layout.inner,
                                               layout.outer, seg.start, seg.length, self.rank(tensor))))
            offset += seg.length

    def member(self, node: gs.Node, port: str, tensor: gs.Tensor, layout: Layout, macs: int = 0) -> None:
        offset = 0
        for seg in layout.segments:
            slot = Slot(tensor.name, layout.axis, offset, layout.width, layout.inner, layout.outer, seg.start,
                        seg.length, self.rank(tensor))
            self.members.append((seg.space, Member(node, port, slot, self.label(node), macs)))
            offset += seg.length

    def origin(self, tensor: gs.Tensor) -> str:
        """Where an untraced tensor's channels come from, for the reason text."""
        seen = 0
        while seen < 1000:
            seen += 1
            if tensor.name in self.inputs:
                return f"the graph input '{tensor.name}'"
            if isinstance(tensor, gs.Constant) or not tensor.inputs:
                return f"'{tensor.name}'"
            producer = tensor.inputs[0]
            if producer.op in RULES and producer.op not in _PRODUCERS and producer.inputs \
                    and not _is_empty(producer.inputs[0]) and self.layout(producer.inputs[0]) is None:
                tensor = producer.inputs[0]
                continue
            if producer.op not in RULES:
                return f"{producer.op} '{self.label(producer)}' (no channel rule for {producer.op})"
            return f"the output of {producer.op} '{self.label(producer)}'"
        return f"'{tensor.name}'"

    def require(self, tensor: gs.Tensor, axis: int, size: int) -> Layout:
        """The tensor's layout, or a blocked one-space layout that says where its channels come from."""
        layout = self.layout(tensor)
        if layout is None:
            space = self.new_space(size, f"its channels come from {self.origin(tensor)}")
            layout = Layout(axis, (Segment(space, 0, size),))
            self.set_layout(tensor, layout)
        return layout

    def opaque(self, tensor: gs.Tensor, axis: int, size: int | None, reason: str) -> None:
        """Give an output a fresh blocked space (e.g. a Conv with a non-constant weight still has channels)."""
        if size:
            self.set_layout(tensor, Layout(axis, (Segment(self.new_space(size, reason), 0, size),)))

    def couple(self, a: Layout, b: Layout, where: str) -> bool:
        """Join two layouts that must keep the same channels (both sides of an Add); False (and block) if they
        are not aligned."""
        if a.segments == b.segments:
            return True
        aligned = (len(a.segments) == len(b.segments) and a.inner == b.inner and a.outer == b.outer and all(
            sa.length == sb.length and sa.start == 0 and sb.start == 0 and sa.length == self.sizes[sa.space]
            and sb.length == self.sizes[sb.space] for sa, sb in zip(a.segments, b.segments)))
        if not aligned:
            reason = f"{where} combines channels that come from differently split sources"
            self.block(a, reason)
            self.block(b, reason)
            return False
        for sa, sb in zip(a.segments, b.segments):
            self.union(sa.space, sb.space)
        return True

    def macs(self, node: gs.Node) -> int:
        """Multiply-accumulates of a Conv/ConvTranspose/Gemm/MatMul from the inferred shapes (0 if unknown)."""
        out = self.dims(node.outputs[0])
        w = self.dims(node.inputs[1]) if len(node.inputs) > 1 else None
        x = self.dims(node.inputs[0])
        if out is None or w is None:
            return 0
        if node.op == "Conv":
            return _prod(out) * _prod(w[1:])
        if node.op == "ConvTranspose":
            return 0 if x is None else _prod(x) * _prod(w[1:])
        if node.op == "Gemm":
            return 0 if x is None else _prod(out) * (x[0] if node.attrs.get("transA", 0) else x[1])
        if node.op == "MatMul":
            return 0 if x is None else _prod(out) * x[-1]
        return 0


def sub_layout(layout: Layout, lo: int, hi: int) -> Layout:
    """Channel positions [lo, hi) of a layout (whole or clipped segments)."""
    segments, offset = [], 0
    for seg in layout.segments:
        a, b = max(lo, offset), min(hi, offset + seg.length)
        if a < b:
            segments.append(Segment(seg.space, seg.start + a - offset, b - a))
        offset += seg.length
    return Layout(layout.axis, tuple(segments), layout.inner, layout.outer)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _opset(graph: gs.Graph) -> int:
    return int(graph.opset or 13)


# --- rules: one function per op type; each sets its outputs' layouts and records members or blocking reasons ---

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _unknown(an: _Analysis, node: gs.Node) -> None:
    for t in node.inputs:
        an.block(an.layout(t), f"it reaches {node.op} '{an.label(node)}', which has no channel rule")


def _same(an: _Analysis, node: gs.Node) -> None:
    """Elementwise unary ops (and Identity, Cast, Clip with scalar bounds, ...): channels pass unchanged."""
    layout = an.layout(node.inputs[0]) if node.inputs else None
    if layout is None:
        return
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _dropout(an: _Analysis, node: gs.Node) -> None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        _unknown(an, node)
        an.block(an.layout(node.inputs[0]), f"the mask output of Dropout '{an.label(node)}' is used")
        return
    _same(an, node)


def _elementwise(an: _Analysis, node: gs.Node) -> None:
    """Add/Sub/Mul/Div/PRelu/...: traced inputs are coupled (residual Add), broadcast constants are cut along."""
    out = node.outputs[0]
    rank = an.rank(out)
    carried, free, consts = [], [], []
    for i, t in enumerate(node.inputs):
        if _is_empty(t):
            continue
        if constant_shape(t) is not None:
            consts.append(i)
            continue
        layout = an.layout(t)
        if layout is None:
            free.append(t)
        else:
            carried.append((t, layout))
    if not carried:
        return
    where = f"{node.op} '{an.label(node)}'"
    if rank is None or any(an.rank(t) is None for t, _ in carried):
        for _, layout in carried:
            an.block(layout, f"the shapes around {where} are unknown")
        return
    axes = {layout.axis + rank - an.rank(t) for t, layout in carried}
    ref = carried[0][1]
    if len(axes) > 1 or any((lay.inner, lay.outer, lay.width) != (ref.inner, ref.outer, ref.width)
                            for _, lay in carried):
        for _, layout in carried:
            an.block(layout, f"the channel axes of the inputs of {where} do not line up")
        return
    axis = axes.pop()
    out_layout = replace(ref, axis=axis)
    for _, layout in carried[1:]:
        an.couple(ref, layout, where)
    for t in free:
        shape = an.shape(t)
        k = axis - (rank - len(shape)) if shape is not None else -1
        if shape is None or (k >= 0 and shape[k] != 1):
            an.block(ref, f"{where} combines them with '{t.name}', whose channels come from {an.origin(t)}")
    port = "pass"
    for i in consts:
        shape = constant_shape(node.inputs[i])
        k = axis - (rank - len(shape))
        if k < 0 or shape[k] == 1:
            continue
        if shape[k] != out_layout.extent:
            an.block(ref, f"the constant '{node.inputs[i].name}' of {where} does not broadcast per channel")
            return
        port = "param"
    an.member(node, port, out, out_layout)
    an.set_layout(out, out_layout)


def _conv(an: _Analysis, node: gs.Node) -> None:
    """Conv: input channels are read (`in`), a new space is written (`out`); depthwise convs pass channels through."""
    x, out = node.inputs[0], node.outputs[0]
    w = weight_shape(node.inputs[1])
    where = f"Conv '{an.label(node)}'"
    bias = _input(node, 2)
    if w is None or (bias is not None and weight_shape(bias) is None):
        an.block(an.layout(x), f"{where} has a non-constant weight or bias")
        shape = an.shape(out)
        an.opaque(out, 1, shape[1] if shape and len(shape) > 1 else None, f"{where} has a non-constant weight or bias")
        return
    group = int(node.attrs.get("group", 1))
    m, per_group = int(w[0]), int(w[1])
    layout = an.require(x, 1, per_group * group)
    macs = an.macs(node)
    bad_axis = layout.axis != 1 or layout.outer != 1 or layout.extent != per_group * group
    if bad_axis:
        an.block(layout, f"the channels are not on the input channel axis of {where}")
    if group > 1 and per_group == 1 and m % group == 0 and not bad_axis:
        an.member(node, "dw", x, layout, macs)
        problem = _cut_problem(node, [(1, 0), (2, 0)], where)
        if problem:
            an.block(layout, problem)
        an.set_layout(out, replace(layout, inner=layout.inner * (m // group)))
        return
    if group > 1:
        reason = f"{where} is a grouped convolution (group={group}, {per_group} channels per group)"
        an.block(layout, reason)
        an.opaque(out, 1, m, reason)
        return
    if not bad_axis:
        an.member(node, "in", x, layout, macs)
        problem = _cut_problem(node, [(1, 1)], where)
        if problem:
            an.block(layout, problem)
    out_layout = Layout(1, (Segment(an.new_space(m, _cut_problem(node, [(1, 0), (2, 0)], where)), 0, m),))
    an.member(node, "out", out, out_layout, macs)
    an.set_layout(out, out_layout)


def _conv_transpose(an: _Analysis, node: gs.Node) -> None:
    """ConvTranspose, weight [C_in, M/group, k...]: like Conv with the weight axes swapped."""
    x, out = node.inputs[0], node.outputs[0]
    w = weight_shape(node.inputs[1])
    where = f"ConvTranspose '{an.label(node)}'"
    bias = _input(node, 2)
    if w is None or (bias is not None and weight_shape(bias) is None):
        an.block(an.layout(x), f"{where} has a non-constant weight or bias")
        shape = an.shape(out)
        an.opaque(out, 1, shape[1] if shape and len(shape) > 1 else None, f"{where} has a non-constant weight")
        return
    group = int(node.attrs.get("group", 1))
    cin, per_group = int(w[0]), int(w[1])
    layout = an.require(x, 1, cin)
    macs = an.macs(node)
    bad_axis = layout.axis != 1 or layout.outer != 1 or layout.extent != cin
    if bad_axis:
        an.block(layout, f"the channels are not on the input channel axis of {where}")
    if group > 1 and group == cin and not bad_axis:
        an.member(node, "dw", x, layout, macs)
        problem = _cut_problem(node, [(1, 0), (2, 0)], where)
        if problem:
            an.block(layout, problem)
        an.set_layout(out, replace(layout, inner=layout.inner * per_group))
        return
    if group > 1:
        reason = f"{where} is a grouped convolution (group={group})"
        an.block(layout, reason)
        an.opaque(out, 1, per_group * group, reason)
        return
    if not bad_axis:
        an.member(node, "in", x, layout, macs)
        problem = _cut_problem(node, [(1, 0)], where)
        if problem:
            an.block(layout, problem)
    out_space = an.new_space(per_group, _cut_problem(node, [(1, 1), (2, 0)], where))
    out_layout = Layout(1, (Segment(out_space, 0, per_group),))
    an.member(node, "out", out, out_layout, macs)
    an.set_layout(out, out_layout)


def _gemm(an: _Analysis, node: gs.Node) -> None:
    """Gemm with a constant B: A's features are read (`in`, via Flatten: H×W per channel), B's columns written."""
    a, out = node.inputs[0], node.outputs[0]
    b = weight_shape(node.inputs[1])
    c = _input(node, 2)
    where = f"Gemm '{an.label(node)}'"
    if b is None or node.attrs.get("transA", 0) or (c is not None and weight_shape(c) is None):
        an.block(an.layout(a), f"{where} has a non-constant B or C, or transA=1")
        an.block(an.layout(node.inputs[1]), f"{where} has a non-constant B or C, or transA=1")
        shape = an.shape(out)
        an.opaque(out, 1, shape[1] if shape and len(shape) > 1 else None, f"{where} has a non-constant B or C")
        return
    trans_b = int(node.attrs.get("transB", 0))
    k, n = (int(b[1]), int(b[0])) if trans_b else (int(b[0]), int(b[1]))
    layout = an.require(a, 1, k)
    macs = an.macs(node)
    if layout.axis != 1 or layout.extent != k:
        an.block(layout, f"the channels are not on the reduction axis of {where}")
    else:
        an.member(node, "in", a, layout, macs)
        problem = _cut_problem(node, [(1, 1 if trans_b else 0)], where)
        if problem:
            an.block(layout, problem)
    c_shape = weight_shape(c) if c is not None else None
    c_cut = [(2, len(c_shape) - 1)] if c_shape and c_shape[-1] == n and n > 1 else []
    out_space = an.new_space(n, _cut_problem(node, [(1, 0 if trans_b else 1)] + c_cut, where))
    out_layout = Layout(1, (Segment(out_space, 0, n),))
    an.member(node, "out", out, out_layout, macs)
    an.set_layout(out, out_layout)


def _matmul(an: _Analysis, node: gs.Node) -> None:
    """MatMul with a constant 2-D right operand: like Gemm on the last axis; other axes pass through."""
    a, out = node.inputs[0], node.outputs[0]
    b = weight_shape(node.inputs[1])
    where = f"MatMul '{an.label(node)}'"
    rank_a, rank_out = an.rank(a), an.rank(out)
    if b is None or len(b) != 2 or rank_a is None or rank_out is None or rank_a < 2:
        for t in node.inputs:
            an.block(an.layout(t), f"{where} has no constant 2-D weight (`cleanup` folds computed weights)")
        return
    layout = an.layout(a)
    if layout is not None and layout.axis != rank_a - 1:
        an.member(node, "pass", a, layout)
        an.set_layout(out, replace(layout, axis=layout.axis + rank_out - rank_a))
        return
    k, n = int(b[0]), int(b[1])
    layout = an.require(a, rank_a - 1, k)
    macs = an.macs(node)
    if layout.extent != k:
        an.block(layout, f"the channels do not match the reduction axis of {where}")
    else:
        an.member(node, "in", a, layout, macs)
        problem = _cut_problem(node, [(1, 0)], where)
        if problem:
            an.block(layout, problem)
    out_layout = Layout(rank_out - 1, (Segment(an.new_space(n, _cut_problem(node, [(1, 1)], where)), 0, n),))
    an.member(node, "out", out, out_layout, macs)
    an.set_layout(out, out_layout)


def _norm(an: _Analysis, node: gs.Node) -> None:
    """BatchNormalization / InstanceNormalization: per-channel constants on axis 1 are cut along."""
    x = node.inputs[0]
    layout = an.layout(x)
    if layout is None:
        return
    where = f"{node.op} '{an.label(node)}'"
    count = 5 if node.op == "BatchNormalization" else 3
    params = [constant_shape(t) for t in node.inputs[1:count]]
    if node.attrs.get("training_mode", 0) or any(o.outputs for o in node.outputs[1:]):
        an.block(layout, f"{where} is in training mode")
        return
    if any(p is None for p in params):
        an.block(layout, f"{where} has non-constant parameters")
        return
    if layout.axis != 1 or any(_prod(p) != layout.extent for p in params):
        an.block(layout, f"the channels are not on the normalised axis of {where}")
        return
    an.member(node, "param", x, layout)
    an.set_layout(node.outputs[0], layout)


def _pool(an: _Analysis, node: gs.Node) -> None:
    """Pooling over the spatial axes (incl. GlobalAveragePool): channels pass unchanged."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"{node.op} '{an.label(node)}'"
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        an.block(layout, f"the indices output of {where} is used")
        return
    if layout.axis != 1 or layout.outer != 1:
        an.block(layout, f"{where} pools over the axis that holds the channels")
        return
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _pad(an: _Analysis, node: gs.Node) -> None:
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"Pad '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    pads = node.attrs.get("pads") if _opset(an.graph) < 11 else (
        constant_value(node.inputs[1]) if _input(node, 1) is not None else None)
    axes_t = _input(node, 3)
    axes = constant_value(axes_t) if axes_t is not None else None
    if pads is None or rank is None or (axes_t is not None and axes is None):
        an.block(layout, f"{where} has non-constant pads")
        return
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = [_norm_axis(int(a), rank) for a in axes] if axes is not None else list(range(rank))
    if layout.axis in axes:
        i = axes.index(layout.axis)
        if pads[i] != 0 or pads[i + len(axes)] != 0:
            an.block(layout, f"{where} pads the channel axis")
            return
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _resize(an: _Analysis, node: gs.Node) -> None:
    """Resize/Upsample: a scale of 1 on the channel axis passes channels; `sizes` is rewritten when cut."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"{node.op} '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    axes = node.attrs.get("axes")
    axes = [_norm_axis(int(a), rank) for a in axes] if axes is not None and rank else list(range(rank or 0))
    if node.op == "Upsample" and "scales" in node.attrs:
        scales, sizes = np.asarray(node.attrs["scales"]), None
    elif node.op == "Upsample" or _opset(an.graph) < 11:
        scales, sizes = constant_value(node.inputs[1]) if _input(node, 1) is not None else None, None
    else:
        scales = constant_value(node.inputs[2]) if _input(node, 2) is not None else None
        sizes = constant_value(node.inputs[3]) if _input(node, 3) is not None else None
    if rank is None or (scales is None and sizes is None) or layout.axis not in axes:
        an.block(layout, f"{where} has non-constant scales/sizes")
        return
    i = axes.index(layout.axis)
    if scales is not None and scales.size:
        if float(scales.reshape(-1)[i]) != 1.0:
            an.block(layout, f"{where} rescales the channel axis")
            return
        port = "pass"
    elif sizes is not None:
        if int(sizes.reshape(-1)[i]) != layout.extent:
            an.block(layout, f"{where} resizes the channel axis")
            return
        port = "resize"
    else:
        an.block(layout, f"{where} has neither scales nor sizes")
        return
    an.member(node, port, node.outputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _flatten(an: _Analysis, node: gs.Node) -> None:
    """Flatten: each channel owns the H×W (inner) features after it, repeated for the axes before it (outer)."""
    x = node.inputs[0]
    layout = an.layout(x)
    if layout is None:
        return
    dims = an.dims(x)
    where = f"Flatten '{an.label(node)}'"
    if dims is None:
        an.block(layout, f"the input shape of {where} is unknown")
        return
    k = _norm_axis(int(node.attrs.get("axis", 1)), len(dims))
    a = layout.axis
    if a < k:
        an.block(layout, f"{where} merges the channels into its first output axis")
        return
    out_layout = Layout(1, layout.segments, layout.inner * _prod(dims[a + 1:]), layout.outer * _prod(dims[k:a]))
    an.member(node, "pass", x, layout)
    an.set_layout(node.outputs[0], out_layout)


def merged_axis(src: Sequence[int], dst: Sequence[int], axis: int) -> tuple[int, int, int] | None:
    """Where `src` axis `axis` lands when reshaped to `dst`, if it is merged (not split) with its neighbours:
    (output axis, factor before it, factor after it); None if the reshape splits or reorders it."""
    pre = [1]
    for d in src:
        pre.append(pre[-1] * int(d))
    before, through = pre[axis], pre[axis + 1]
    lo = 1
    for b, d in enumerate(dst):
        hi = lo * int(d)
        if lo <= before and hi >= through:
            js = [j for j in range(axis + 1) if pre[j] == lo]
            ks = [k for k in range(axis + 1, len(src) + 1) if pre[k] == hi]
            if not js or not ks:
                return None
            j, k = max(js), min(ks)
            return b, _prod(src[j:axis]), _prod(src[axis + 1:k])
        lo = hi
    return None


def _reshape(an: _Analysis, node: gs.Node) -> None:
    """Reshape that merges the channel axis with its neighbours (NCHW/NHWC flatten); the target is rewritten."""
    x, out = node.inputs[0], node.outputs[0]
    layout = an.layout(x)
    if layout is None:
        return
    where = f"Reshape '{an.label(node)}'"
    shape_value = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    src, dst = an.dims(x), an.dims(out)
    if shape_value is None:
        an.block(layout, f"{where} has a computed shape (run `cleanup` first to fold it)")
        return
    if src is None or dst is None:
        an.block(layout, f"the shapes around {where} are unknown")
        return
    where_to = merged_axis(src, dst, layout.axis)
    if where_to is None:
        an.block(layout, f"{where} splits or reorders the channel axis")
        return
    b, before, after = where_to
    out_layout = Layout(b, layout.segments, layout.inner * after, layout.outer * before)
    an.member(node, "reshape", out, out_layout)
    an.set_layout(out, out_layout)


def _transpose(an: _Analysis, node: gs.Node) -> None:
    """Transpose (NHWC models): the channel axis moves to where the permutation puts it."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank = an.rank(node.inputs[0])
    perm = node.attrs.get("perm")
    if perm is None:
        if rank is None:
            an.block(layout, f"the rank around Transpose '{an.label(node)}' is unknown")
            return
        perm = list(reversed(range(rank)))
    perm = [int(p) for p in perm]
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], replace(layout, axis=perm.index(layout.axis)))


def _axes(an: _Analysis, node: gs.Node, input_index: int, rank: int | None) -> list[int] | None:
    """An op's `axes`, from the attribute (older opsets) or a constant input; None if unknown."""
    if "axes" in node.attrs:
        values = node.attrs["axes"]
    elif _input(node, input_index) is not None:
        values = constant_value(node.inputs[input_index])
        if values is None:
            return None
    else:
        return []
    if rank is None:
        return None
    return sorted(_norm_axis(int(a), rank) for a in np.asarray(values).reshape(-1))


def _squeeze(an: _Analysis, node: gs.Node) -> None:
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    shape = an.shape(node.inputs[0])
    axes = _axes(an, node, 1, None if shape is None else len(shape))
    if axes == [] and shape is not None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    if axes is None or layout.axis in axes:
        an.block(layout, f"Squeeze '{an.label(node)}' may remove the channel axis")
        return
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], replace(layout, axis=layout.axis - sum(a < layout.axis for a in axes)))


def _unsqueeze(an: _Analysis, node: gs.Node) -> None:
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank_out = an.rank(node.outputs[0])
    axes = _axes(an, node, 1, rank_out)
    if axes is None or rank_out is None:
        an.block(layout, f"the axes of Unsqueeze '{an.label(node)}' are unknown")
        return
    kept = [i for i in range(rank_out) if i not in axes]
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], replace(layout, axis=kept[layout.axis]))


def _reduce(an: _Analysis, node: gs.Node) -> None:
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank = an.rank(node.inputs[0])
    axes = _axes(an, node, 1, rank)
    where = f"{node.op} '{an.label(node)}'"
    if axes is None or (axes == [] and not node.attrs.get("noop_with_empty_axes", 0)) or layout.axis in axes:
        an.block(layout, f"{where} reduces over the channel axis")
        return
    keep = int(node.attrs.get("keepdims", 1))
    axis = layout.axis if keep else layout.axis - sum(a < layout.axis for a in axes)
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], replace(layout, axis=axis))


def _softmax(an: _Analysis, node: gs.Node) -> None:
    """Softmax-like ops normalise across an axis: channels pass only if it is another axis."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank = an.rank(node.inputs[0])
    if rank is None:
        an.block(layout, f"the rank around {node.op} '{an.label(node)}' is unknown")
        return
    if _opset(an.graph) < 13:  # coerced to 2-D at `axis`: every axis from `axis` on is normalised together
        axis = _norm_axis(int(node.attrs.get("axis", 1)), rank)
        couples = layout.axis >= axis
    else:
        couples = layout.axis == _norm_axis(int(node.attrs.get("axis", -1)), rank)
    if couples:
        an.block(layout, f"{node.op} '{an.label(node)}' normalises across the channels")
        return
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _concat(an: _Analysis, node: gs.Node) -> None:
    """Concat along the channels appends layouts (offsets); along another axis it couples its inputs."""
    out = node.outputs[0]
    rank = an.rank(out)
    layouts = [an.layout(t) for t in node.inputs]
    if not any(layouts):
        return
    where = f"Concat '{an.label(node)}'"
    if rank is None:
        for layout in layouts:
            an.block(layout, f"the rank around {where} is unknown")
        return
    axis = _norm_axis(int(node.attrs.get("axis", 0)), rank)
    if any(layout is not None and layout.axis == axis for layout in layouts):
        segments: list[Segment] = []
        inner = next(layout.inner for layout in layouts if layout is not None and layout.axis == axis)
        for t, layout in zip(node.inputs, layouts):
            if layout is None or layout.axis != axis or layout.inner != inner or layout.outer != 1:
                reason = f"{where} concatenates them with '{t.name}' along a different or untraced axis"
                shape = an.shape(t)
                size = shape[axis] if shape is not None and len(shape) > axis else None
                if layout is not None or not size or size % inner:
                    for other in layouts:
                        an.block(other, reason)
                    return
                layout = an.require(t, axis, size // inner)
                layout = replace(layout, inner=inner)
            segments.extend(layout.segments)
        out_layout = Layout(axis, tuple(segments), inner, 1)
        for t, layout in zip(node.inputs, layouts):
            if layout is not None:
                an.member(node, "pass", t, layout)
        an.set_layout(out, out_layout)
        return
    carried = [lay for lay in layouts if lay is not None]
    ref = carried[0]
    if any(lay.axis != ref.axis or lay.inner != ref.inner or lay.outer != ref.outer for lay in carried) \
            or len(carried) != len(layouts):
        for lay in carried:
            an.block(lay, f"{where} joins tensors whose channels do not line up")
        return
    for lay in carried[1:]:
        an.couple(ref, lay, where)
    an.member(node, "pass", out, ref)
    an.set_layout(out, ref)


def _split_sizes(node: gs.Node, width: int) -> list[int] | None:
    """A Split's output sizes: the `split` attribute (opset < 13), the constant input, or equal parts."""
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    if _input(node, 1) is not None:
        value = constant_value(node.inputs[1])
        return None if value is None else [int(s) for s in value.reshape(-1)]
    parts = int(node.attrs.get("num_outputs", len(node.outputs)))
    step = -(-width // parts)
    return [min(step, width - i * step) for i in range(parts)]


def _split(an: _Analysis, node: gs.Node) -> None:
    """Split along the channels gives each output its range of channels; the sizes are rewritten when cut."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"Split '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    if rank is None:
        an.block(layout, f"the rank around {where} is unknown")
        return
    axis = _norm_axis(int(node.attrs.get("axis", 0)), rank)
    if axis != layout.axis:
        an.member(node, "pass", node.inputs[0], layout)
        for out in node.outputs:
            an.set_layout(out, layout)
        return
    sizes = _split_sizes(node, layout.extent)
    if sizes is None or layout.inner != 1 or layout.outer != 1 or sum(sizes) != layout.width:
        an.block(layout, f"{where} splits the channels in a way the analysis cannot follow")
        return
    an.member(node, "split", node.inputs[0], layout)
    lo = 0
    for out, size in zip(node.outputs, sizes):
        part = sub_layout(layout, lo, lo + size)
        an.parts.extend((s.space, s.start, s.length) for s in part.segments)
        an.set_layout(out, part)
        lo += size


def _slice(an: _Analysis, node: gs.Node) -> None:
    """Slice with step 1 along the channels keeps a range of channels; its bounds are rewritten when cut."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"Slice '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    params = _slice_params(an.graph, node)
    if params is None or rank is None:
        an.block(layout, f"{where} has non-constant bounds")
        return
    starts, ends, axes, steps = params
    axes = [_norm_axis(a, rank) for a in (axes if axes is not None else range(len(starts)))]
    if layout.axis not in axes:
        an.member(node, "pass", node.inputs[0], layout)
        an.set_layout(node.outputs[0], layout)
        return
    i = axes.index(layout.axis)
    if (steps is not None and steps[i] != 1) or layout.inner != 1 or layout.outer != 1:
        an.block(layout, f"{where} takes every n-th channel or slices merged channels")
        return
    lo, hi = _clamp_range(starts[i], ends[i], layout.width)
    part = sub_layout(layout, lo, hi)
    an.member(node, "slice", node.inputs[0], layout)
    an.parts.extend((s.space, s.start, s.length) for s in part.segments)
    an.set_layout(node.outputs[0], part)


def _slice_params(graph: gs.Graph, node: gs.Node):
    if _opset(graph) < 10:
        attrs = node.attrs
        if "starts" not in attrs:
            return None
        return ([int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]],
                None if "axes" not in attrs else [int(v) for v in attrs["axes"]], None)
    values = []
    for index in (1, 2, 3, 4):
        t = _input(node, index)
        if t is None:
            values.append(None)
            continue
        v = constant_value(t)
        if v is None:
            return None
        values.append([int(x) for x in v.reshape(-1)])
    if values[0] is None or values[1] is None:
        return None
    return tuple(values)


def _clamp_range(start: int, end: int, width: int) -> tuple[int, int]:
    start = start + width if start < 0 else start
    end = end + width if end < 0 else end
    return min(max(start, 0), width), min(max(end, 0), width)


def _shape(an: _Analysis, node: gs.Node) -> None:
    """Shape reads the channel count unless only other dimensions are gathered from it (x.view(x.size(0), -1))."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank = an.rank(node.inputs[0])
    start = int(node.attrs.get("start", 0))
    safe = rank is not None and bool(node.outputs[0].outputs) and node.outputs[0] not in an.graph.outputs
    for consumer in node.outputs[0].outputs:
        indices = constant_value(consumer.inputs[1]) if consumer.op == "Gather" and len(consumer.inputs) > 1 else None
        if indices is None or int(consumer.attrs.get("axis", 0)) != 0:
            safe = False
            break
        dims = [_norm_axis(int(i), rank - start) + _norm_axis(start, rank) for i in indices.reshape(-1)]
        if layout.axis in dims:
            safe = False
            break
    if not safe:
        an.block(layout, f"its shape is read by Shape '{an.label(node)}'")


def _quantize_linear(an: _Analysis, node: gs.Node) -> None:
    """QuantizeLinear / DequantizeLinear of an activation (the QDQ pairs `quant` puts before a layer): a per-tensor
    scale passes the channels; per-channel scales on the channel axis are cut along (port `param`)."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return  # a weight's DequantizeLinear, or an untraced tensor
    where = f"{node.op} '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    params = [_input(node, i) for i in (1, 2)]
    shapes = [constant_shape(t) if t is not None else () for t in params]
    if any(s is None for s in shapes):
        an.block(layout, f"{where} has a computed scale or zero point")
        return
    if int(node.attrs.get("block_size", 0) or 0):
        an.block(layout, f"{where} is block-quantized")
        return
    port = "pass"
    if any(_prod(s) > 1 for s in shapes):
        axis = _norm_axis(int(node.attrs.get("axis", 1)), rank) if rank is not None else None
        if axis is None or (axis == layout.axis and any(_prod(s) != layout.extent for s in shapes if _prod(s) > 1)):
            an.block(layout, f"the scales of {where} do not line up with the channels")
            return
        if axis == layout.axis:
            port = "param"
    an.member(node, port, node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _layer_norm(an: _Analysis, node: gs.Node) -> None:
    """LayerNormalization normalises over the axes from `axis` on: channels there are coupled by the statistics
    (a transformer's residual stream is not prunable); channels on an earlier axis pass unchanged."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank = an.rank(node.inputs[0])
    if rank is None or layout.axis >= _norm_axis(int(node.attrs.get("axis", -1)), rank):
        an.block(layout, f"{node.op} '{an.label(node)}' normalises across the channels")
        return
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _size(an: _Analysis, node: gs.Node) -> None:
    an.block(an.layout(node.inputs[0]), f"its element count is read by Size '{an.label(node)}'")


Rule = Callable[[_Analysis, gs.Node], None]

#: How channels flow through each op type. An op missing here blocks every group that reaches it.
RULES: dict[str, Rule] = {
    **{op: _same for op in (
        "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
        "Softplus", "Softsign", "Mish", "Gelu", "ThresholdedRelu", "Exp", "Log", "Abs", "Neg", "Sqrt", "Erf",
        "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "Swish")},
    **{op: _elementwise for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu")},
    **{op: _pool for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                            "GlobalLpPool")},
    **{op: _norm for op in ("BatchNormalization", "InstanceNormalization")},
    **{op: _reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
    **{op: _softmax for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: _layer_norm for op in ("LayerNormalization", "RMSNormalization")},
    "Dropout": _dropout,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Shape": _shape,
    "Size": _size,
    "QuantizeLinear": _quantize_linear,
    "DequantizeLinear": _quantize_linear,
}


def channel_groups(graph: gs.Graph, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[Group]:
    """The groups of channels that must be removed together, each prunable or with the reasons it is not.

    The graph is not modified. `input_shapes` fixes dynamic input dimensions for shape inference (a dynamic
    leading batch dimension is taken as 1 otherwise). Groups describe the graph as it is now: after cutting,
    analyse again.
    """
    an = _Analysis(graph, infer_shapes(graph, input_shapes))
    for node in topological_order(graph):
        RULES.get(node.op, _unknown)(an, node)
    for out in graph.outputs:
        an.block(an.layout(out), f"it reaches the graph output '{out.name}'")
    return _collect(an)


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes in a topological order, as close to their stored order as possible (graph unchanged)."""
    producers = {id(t): n for n in graph.nodes for t in n.outputs}
    done: set[int] = set()
    order: list[gs.Node] = []

    def visit(node: gs.Node) -> None:
        stack = [(node, False)]
        while stack:
            current, ready = stack.pop()
            if id(current) in done:
                continue
            if ready:
                done.add(id(current))
                order.append(current)
                continue
            stack.append((current, True))
            for t in reversed(current.inputs):
                producer = producers.get(id(t))
                if producer is not None and id(producer) not in done:
                    stack.append((producer, False))

    for node in graph.nodes:
        visit(node)
    return order


def _collect(an: _Analysis) -> list[Group]:
    roots: dict[int, Group] = {}
    for space in range(len(an.parent)):
        root = an.find(space)
        if root not in roots:
            roots[root] = Group(len(roots), an.sizes[root], [], [], [])
        group = roots[root]
        for reason in an.reasons.get(space, []):
            if reason not in group.reasons:
                group.reasons.append(reason)
    for space, member in an.members:
        roots[an.find(space)].members.append(member)
    for space, slot in an.slots:
        roots[an.find(space)].slots.append(slot)
    for space, start, length in an.parts:
        group = roots[an.find(space)]
        if (start, length) != (0, group.size) and (start, start + length) not in group.parts:
            group.parts.append((start, start + length))
    return [g for g in roots.values() if g.size > 0]


def describe(groups: Sequence[Group]) -> str:
    """Text for `squeeze inspect`: each group's size, members, and whether it can be pruned (or why not)."""
    lines = []
    prunable = sum(g.prunable for g in groups)
    lines.append(f"{len(groups)} channel group(s), {prunable} prunable "
                 f"({sum(g.size for g in groups if g.prunable)} of {sum(g.size for g in groups)} channels)")
    for g in groups:
        status = "prunable" if g.prunable else "NOT prunable"
        lines.append("")
        lines.append(f"group {g.index}: {g.size} channels, {status}")
        for port, title in (("out", "written by"), ("dw", "depthwise"), ("param", "per-channel constants"),
                            ("in", "read by"), ("split", "split by"), ("slice", "sliced by"),
                            ("reshape", "reshaped by"), ("resize", "resized by"), ("pass", "passes through")):
            names = list(dict.fromkeys(f"{m.label} ({m.op})" if port != "pass" else m.label
                                       for m in g.members if m.port == port))
            if names:
                lines.append(f"  {title}: " + ", ".join(names))
        for reason in g.reasons:
            lines.append(f"  not prunable: {reason}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- cutting


@dataclass
class Cut:
    """What to cut at one (node, port): the channel positions to keep in `tensor` along `axis`."""

    node: gs.Node | None
    port: str
    tensor: str
    axis: int
    inner: int
    outer: int
    keep: np.ndarray  # bool per channel position
    rank: int | None = None

    def indices(self) -> np.ndarray:
        """Element indices to keep along the axis."""
        return expand(self.keep, self.inner, self.outer)

    @property
    def extent(self) -> int:
        return len(self.keep) * self.inner * self.outer


def set_constant_input(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> None:
    """Give `node` a new constant input `index`: in place when nothing else reads the old one, else a fresh
    tensor (a shared original stays untouched); appended when the optional input is absent. When the old input
    is a weight that `codebook` or `quant` compressed, the values are stored compressed the same way
    (`weights.replace_compressed`: snapped to the codebook, or requantized), so a refit keeps the layer small."""
    values = np.ascontiguousarray(values)
    old = node.inputs[index] if index < len(node.inputs) else None
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = values
        return
    if isinstance(old, gs.Variable) and old.inputs and replace_compressed(graph, node, index, values):
        return
    base = old.name if old is not None and old.name else f"{node.name or node.op}_{index}"
    fresh = gs.Constant(fresh_name(graph, base + "_pruned"), values)
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if index < len(node.inputs):
        node.inputs[index] = fresh
    else:
        node.inputs.append(fresh)


def _take_input(graph: gs.Graph, node: gs.Node, index: int, idx: np.ndarray, axis: int) -> None:
    """Keep only `idx` along `axis` of input `index` (absent: nothing to do): a constant is cut, a weight that
    `codebook` or `quant` compressed is cut in its compressed form (`weights.take_compressed`)."""
    t = _input(node, index)
    if t is None:
        return
    value = constant_value(t)
    if value is not None:
        set_constant_input(graph, node, index, np.take(value, idx, axis=axis))
    elif not take_compressed(graph, node, index, idx, axis):
        raise ValueError(f"input {index} ('{t.name}') of {node.op} '{node.name}' is neither a constant nor a "
                         "compressed weight; it cannot be cut")


def _cut_conv(graph: gs.Graph, cut: Cut) -> None:
    node = cut.node
    idx = cut.indices()
    if cut.port == "in":
        _take_input(graph, node, 1, idx, 1)
    elif cut.port == "out":
        _take_input(graph, node, 1, idx, 0)
        _take_input(graph, node, 2, idx, 0)
    elif cut.port == "dw":
        mult = weight_shape(node.inputs[1])[0] // int(node.attrs.get("group", 1))
        rows = (idx[:, None] * mult + np.arange(mult)[None, :]).reshape(-1)
        _take_input(graph, node, 1, rows, 0)
        _take_input(graph, node, 2, rows, 0)
        node.attrs["group"] = int(len(idx))


def _cut_conv_transpose(graph: gs.Graph, cut: Cut) -> None:
    node = cut.node
    idx = cut.indices()
    if cut.port == "in":
        _take_input(graph, node, 1, idx, 0)
    elif cut.port == "out":
        _take_input(graph, node, 1, idx, 1)
        _take_input(graph, node, 2, idx, 0)
    elif cut.port == "dw":
        mult = weight_shape(node.inputs[1])[1]
        _take_input(graph, node, 1, idx, 0)
        rows = (idx[:, None] * mult + np.arange(mult)[None, :]).reshape(-1)
        _take_input(graph, node, 2, rows, 0)
        node.attrs["group"] = int(len(idx))


def _cut_gemm(graph: gs.Graph, cut: Cut) -> None:
    node = cut.node
    idx = cut.indices()
    b = weight_shape(node.inputs[1])
    trans_b = int(node.attrs.get("transB", 0))
    if cut.port == "in":
        _take_input(graph, node, 1, idx, 1 if trans_b else 0)
    elif cut.port == "out":
        n = b[0] if trans_b else b[1]
        _take_input(graph, node, 1, idx, 0 if trans_b else 1)
        c = _input(node, 2)
        c_shape = weight_shape(c) if c is not None else None
        if c_shape and c_shape[-1] == n and n > 1:
            _take_input(graph, node, 2, idx, len(c_shape) - 1)


def _cut_matmul(graph: gs.Graph, cut: Cut) -> None:
    _take_input(graph, cut.node, 1, cut.indices(), 0 if cut.port == "in" else 1)


def _cut_norm(graph: gs.Graph, cut: Cut) -> None:
    idx = cut.indices()
    for index in range(1, 5 if cut.node.op == "BatchNormalization" else 3):
        _take_input(graph, cut.node, index, idx, 0)


def _cut_elementwise(graph: gs.Graph, cut: Cut) -> None:
    """Cut every broadcast constant that is per channel (its dimension at the channel axis is not 1)."""
    node = cut.node
    idx = cut.indices()
    for i, t in enumerate(node.inputs):
        value = constant_value(t) if not _is_empty(t) else None
        if value is None:
            continue
        k = cut.axis - (cut.rank - value.ndim)
        if 0 <= k < value.ndim and value.shape[k] == cut.extent and value.shape[k] != 1:
            set_constant_input(graph, node, i, np.take(value, idx, axis=k))


def _cut_split(graph: gs.Graph, cut: Cut) -> None:
    node = cut.node
    sizes = _split_sizes(node, len(cut.keep))
    new, lo = [], 0
    for size in sizes:
        new.append(int(cut.keep[lo:lo + size].sum()))
        lo += size
    if min(new) == 0:
        raise ValueError(f"cutting would empty an output of Split '{node.name}'")
    if "split" in node.attrs:
        node.attrs["split"] = new
    elif _input(node, 1) is not None:
        set_constant_input(graph, node, 1, np.array(new, dtype=np.int64))
    elif _opset(graph) >= 13:
        node.attrs.pop("num_outputs", None)
        node.inputs.append(gs.Constant(fresh_name(graph, (node.name or "split") + "_sizes"), np.array(new, np.int64)))
    else:
        node.attrs["split"] = new


def _cut_slice(graph: gs.Graph, cut: Cut) -> None:
    node = cut.node
    starts, ends, axes, _ = _slice_params(graph, node)
    axes = [_norm_axis(a, cut.rank) for a in axes] if axes is not None else list(range(len(starts)))
    i = axes.index(cut.axis)
    lo, hi = _clamp_range(starts[i], ends[i], len(cut.keep))
    starts, ends = list(starts), list(ends)
    starts[i], ends[i] = int(cut.keep[:lo].sum()), int(cut.keep[:hi].sum())
    if starts[i] == ends[i]:
        raise ValueError(f"cutting would empty the output of Slice '{node.name}'")
    if _opset(graph) < 10:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
    else:
        set_constant_input(graph, node, 1, np.array(starts, dtype=constant_value(node.inputs[1]).dtype))
        set_constant_input(graph, node, 2, np.array(ends, dtype=constant_value(node.inputs[2]).dtype))


def _cut_quantize_linear(graph: gs.Graph, cut: Cut) -> None:
    """Per-channel scale and zero point of an activation's QuantizeLinear / DequantizeLinear."""
    idx = cut.indices()
    for index in (1, 2):
        t = _input(cut.node, index)
        if t is not None and _prod(constant_shape(t)) == cut.extent:
            _take_input(graph, cut.node, index, idx, 0)


def _cut_reshape(graph: gs.Graph, cut: Cut) -> None:
    shape = constant_value(cut.node.inputs[1]).copy()
    if shape[cut.axis] > 0:
        shape[cut.axis] = cut.outer * int(cut.keep.sum()) * cut.inner
        set_constant_input(graph, cut.node, 1, shape)


def _cut_resize(graph: gs.Graph, cut: Cut) -> None:
    sizes = constant_value(cut.node.inputs[3]).copy()
    axes = cut.node.attrs.get("axes")
    i = list(axes).index(cut.axis) if axes is not None else cut.axis
    sizes[i] = cut.outer * int(cut.keep.sum()) * cut.inner
    set_constant_input(graph, cut.node, 3, sizes)


Cutter = Callable[[gs.Graph, Cut], None]

#: How to cut one op, for each member port other than `pass`.
CUTTERS: dict[str, Cutter] = {
    "Conv": _cut_conv,
    "ConvTranspose": _cut_conv_transpose,
    "Gemm": _cut_gemm,
    "MatMul": _cut_matmul,
    "BatchNormalization": _cut_norm,
    "InstanceNormalization": _cut_norm,
    **{op: _cut_elementwise for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu")},
    "Split": _cut_split,
    "Slice": _cut_slice,
    "Reshape": _cut_reshape,
    "Resize": _cut_resize,
    "QuantizeLinear": _cut_quantize_linear,
    "DequantizeLinear": _cut_quantize_linear,
}


def _checked_keep(group: Group, keep: Sequence[int]) -> np.ndarray:
    keep = np.unique(np.asarray(keep, dtype=np.int64))
    if not group.prunable:
        raise ValueError(f"group {group.index} ({group.name}) is not prunable: {'; '.join(group.reasons)}")
    if keep.size == 0:
        raise ValueError(f"group {group.index} ({group.name}): refusing to remove every channel")
    if keep[0] < 0 or keep[-1] >= group.size:
        raise ValueError(f"group {group.index}: channel indices must be in [0, {group.size})")
    return keep


def tensor_masks(plan: Mapping[Group, Sequence[int]]) -> dict[str, Cut]:
    """For every tensor the plan changes: which channel positions survive (a `Cut` without a node)."""
    masks: dict[str, Cut] = {}
    for group, keep in plan.items():
        removed = np.setdiff1d(np.arange(group.size), _checked_keep(group, keep))
        for slot in group.slots:
            cut = masks.setdefault(slot.tensor, Cut(None, "tensor", slot.tensor, slot.axis, slot.inner, slot.outer,
                                                    np.ones(slot.width, bool), slot.rank))
            gone = removed[(removed >= slot.start) & (removed < slot.start + slot.length)]
            cut.keep[slot.offset + gone - slot.start] = False
    return masks


def apply_plan(graph: gs.Graph, plan: Mapping[Group, Sequence[int]]) -> None:
    """Remove, for every group in `plan`, all channels except the kept ones, from every member at once.

    The groups must come from `channel_groups` on this graph as it is now. Weight tensors, biases, BN statistics,
    Split/Slice/Reshape/Resize constants shrink; intermediate tensor shapes are cleared for re-inference.
    """
    cuts: dict[tuple[int, str, str], Cut] = {}
    for group, keep in plan.items():
        removed = np.setdiff1d(np.arange(group.size), _checked_keep(group, keep))
        for m in group.members:
            s = m.slot
            cut = cuts.setdefault((id(m.node), m.port, s.tensor),
                                  Cut(m.node, m.port, s.tensor, s.axis, s.inner, s.outer, np.ones(s.width, bool),
                                      s.rank))
            gone = removed[(removed >= s.start) & (removed < s.start + s.length)]
            cut.keep[s.offset + gone - s.start] = False
    for cut in cuts.values():
        if cut.port == "pass" or cut.keep.all():
            continue
        if not cut.keep.any():
            raise ValueError(f"cutting would remove every channel of '{cut.tensor}'")
        CUTTERS[cut.node.op](graph, cut)
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    for group in plan:
        for slot in group.slots:
            t = tensors.get(slot.tensor)
            if isinstance(t, gs.Variable) and slot.tensor not in outputs:
                t.shape = None


def remove_channels(graph: gs.Graph, group: Group, keep: Sequence[int]) -> None:
    """Physically remove every channel of `group` except `keep` (indices into the group's channels)."""
    apply_plan(graph, {group: keep})


# -------------------------------------------------------------------------------------------------- planning


def round_keep(size: int, keep: float, multiple: int) -> int:
    """Channels to keep: `keep` rounded to a multiple of `multiple`, at least `multiple`, at most `size`."""
    if multiple <= 1:
        return int(min(size, max(1, round(keep))))
    rounded = int(multiple * round(keep / multiple))
    return int(min(size if size % multiple == 0 else size - size % multiple, max(multiple, rounded)))


def plan_removal(scores: Mapping[Group, np.ndarray], ratio: float, scope: str, multiple: int,
                 normalize: bool = True, threshold: float | None = None) -> dict[Group, np.ndarray]:
    """Kept channels per group: the highest-scoring ones.

    `layer`: every group loses `ratio` of its channels. `global`: the lowest `ratio` of all channels go, ranked
    by score (divided by the group's mean score when `normalize`, so layers of different scale compare).
    `threshold`: channels scoring below it go (overrides `ratio`). Every group keeps at least `multiple`
    channels (at least one), rounded to a multiple of `multiple`; each part of a group that a Split or Slice
    separates keeps at least one channel. Groups that would lose nothing are left out.
    """
    counts: dict[Group, float] = {}
    if threshold is not None:
        counts = {g: float((s >= threshold).sum()) for g, s in scores.items()}
    elif scope == "layer":
        counts = {g: g.size * (1.0 - ratio) for g in scores}
    else:
        pool = []
        for g, s in scores.items():
            mean = float(np.mean(s)) if normalize else 1.0
            pool.append(s / mean if mean > 0 else np.ones_like(s))
        flat = np.concatenate(pool) if pool else np.zeros(0)
        removed = np.zeros(flat.size, bool)
        removed[np.argsort(flat, kind="stable")[:int(round(ratio * flat.size))]] = True
        lo = 0
        for g in scores:
            counts[g] = float(g.size - removed[lo:lo + g.size].sum())
            lo += g.size
    plan = {}
    for g, s in scores.items():
        k = round_keep(g.size, counts[g], multiple)
        if k >= g.size:
            continue
        order = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
        keep = set(order[:k].tolist())
        for lo, hi in g.parts:  # a Split/Slice output must not become empty
            if not any(lo <= c < hi for c in keep):
                best = lo + int(np.argmax(s[lo:hi]))
                worst = min(keep, key=lambda c: s[c])
                keep.discard(worst)
                keep.add(best)
        plan[g] = np.array(sorted(keep), dtype=np.int64)
    return plan


# -------------------------------------------------------------------------------------------------- reporting


def note_unprunable(ctx, groups: Sequence[Group]) -> None:
    """One note per blocked group (its size, its writers and why), and the same rows in `ctx.details`."""
    rows = []
    for g in groups:
        if g.prunable:
            continue
        rows.append({"group": g.index, "name": g.name, "channels": g.size, "reasons": list(g.reasons)})
        ctx.note(f"group {g.index} ({g.name}, {g.size} channels) not prunable: {'; '.join(g.reasons)}")
    ctx.details["unprunable"] = rows


def summarize_plan(ctx, candidates: Sequence[Group], plan: Mapping[Group, np.ndarray],
                   scores: Mapping[Group, np.ndarray], ratio: float, scope: str, multiple: int) -> list[dict]:
    """Per group: channels before/after, the spread of its scores, MACs its removal saves; notes on rounding."""
    rows = []
    rounded = []
    for g in candidates:
        s = np.asarray(scores[g], dtype=np.float64)
        after = len(plan[g]) if g in plan else g.size
        row = {"group": g.index, "name": g.name, "channels_before": g.size, "channels_after": after,
               "macs_removed": g.macs_removed(g.size - after),
               "score": {"min": float(s.min()), "median": float(np.median(s)), "max": float(s.max()),
                         "cv": float(s.std() / s.mean()) if s.mean() > 0 else 0.0}}
        if g in plan and after < g.size:
            gone = np.setdiff1d(np.arange(g.size), plan[g])
            row["score"]["removed_max"] = float(s[gone].max())
            row["score"]["kept_min"] = float(s[plan[g]].min())
        rows.append(row)
        if scope == "layer" and abs(after - g.size * (1 - ratio)) >= 0.5 and multiple > 1:
            rounded.append(f"{g.name} {after}/{g.size}")
    if rounded:
        ctx.note(f"kept channels rounded to multiples of {multiple}: " + ", ".join(rounded))
    return rows
