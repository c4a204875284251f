"""Channel spaces: the data types of the channel analysis and the state its rules update.

A group's channel `c` is the same channel in every member; a member says where the group's channels sit in one
tensor: along `axis`, at `offset` in that axis' channel positions, each position owning `inner` consecutive
elements, the whole pattern repeated `outer` times (a flattened NCHW tensor has inner = H×W; a flattened NHWC one
has outer = H×W). `Analysis` keeps the channel spaces (union-find), each tensor's layout, the members and the
reasons that block a space; the per-op rules in `coupling.py` drive it, and `groups_of` turns it into `Group`s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import onnx_graphsurgeon as gs

from .graph_util import constant_shape, is_empty, node_labels, prod


PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  #: ops whose weights open a channel space


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


class Analysis:
    """Propagation state: channel spaces (union-find), each tensor's layout, members, and blocking reasons."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int | None, ...]],
                 rules: Mapping[str, Callable] | None = None):
        self.graph = graph
        self.rules = rules or {}  # the op types with a channel rule (coupling.RULES), for the reason texts
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
        return None if is_empty(tensor) else self.layouts.get(tensor.name)

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
            if producer.op in self.rules and producer.op not in PRODUCERS and producer.inputs \
                    and not is_empty(producer.inputs[0]) and self.layout(producer.inputs[0]) is None:
                tensor = producer.inputs[0]
                continue
            if producer.op not in self.rules:
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
            return prod(out) * prod(w[1:])
        if node.op == "ConvTranspose":
            return 0 if x is None else prod(x) * prod(w[1:])
        if node.op == "Gemm":
            return 0 if x is None else prod(out) * (x[0] if node.attrs.get("transA", 0) else x[1])
        if node.op == "MatMul":
            return 0 if x is None else prod(out) * x[-1]
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




def groups_of(an: Analysis) -> list[Group]:
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
