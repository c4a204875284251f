"""How to cut: physically remove a group's channels from every op it touches.

`CUTTERS` has one small function per op type, applied by `apply_plan` / `remove_channels`, the only functions here
that modify a graph. Weights, biases, BN statistics, Split sizes, Slice bounds, Resize scales and Reshape targets
shrink; no mask or zeroed channel is left behind. Compressed weights (`codebook`, `quant`) stay compressed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .channel_space import Group
from .graph_util import (clamp_range, constant_shape, constant_value, fresh_name, is_empty, node_input, norm_axis,
                         opset, prod, set_constant_input, slice_params, split_sizes, weight_shape)
from .weights import compressed_cut_problem, take_compressed


def cut_problem(node: gs.Node, cuts: Sequence[tuple[int, int]], where: str) -> str | None:
    """Why the compressed weight or bias of `node` cannot be cut (each (input index, axis) in `cuts`), if so."""
    for index, axis in cuts:
        t = node_input(node, index)
        problem = compressed_cut_problem(t, axis) if t is not None else None
        if problem:
            what = "weight" if index == 1 else "bias" if index == 2 else f"input {index}"
            return f"{where} has a compressed {what} that cannot be cut along axis {axis}: {problem}"
    return None


def expand(mask: np.ndarray, inner: int = 1, outer: int = 1) -> np.ndarray:
    """Element indices along an axis for the channel positions where `mask` is True (see `Slot`)."""
    width = len(mask)
    pos = np.flatnonzero(mask)
    idx = (np.arange(outer)[:, None, None] * (width * inner) + pos[None, :, None] * inner
           + np.arange(inner)[None, None, :])
    return idx.reshape(-1)


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


def _take_input(graph: gs.Graph, node: gs.Node, index: int, idx: np.ndarray, axis: int) -> None:
    """Keep only `idx` along `axis` of input `index` (absent: nothing to do): a constant is cut, a weight that
    `codebook` or `quant` compressed is cut in its compressed form (`weights.take_compressed`)."""
    t = node_input(node, index)
    if t is None:
        return
    value = constant_value(t)
    if value is not None:
        set_constant_input(graph, node, index, np.take(value, idx, axis=axis))
    elif not take_compressed(graph, node, index, idx, axis):
        raise ValueError(f"input {index} ('{t.name}') of {node.op} '{node.name}' is neither a constant nor a "
                         "compressed weight; it cannot be cut")


def _cut_conv(graph: gs.Graph, cut: Cut) -> None:
    """Conv (weight [M, C/group, k...]) and ConvTranspose (weight [C, M/group, k...]); the weight's channel axes
    are swapped between the two."""
    node = cut.node
    idx = cut.indices()
    transposed = node.op == "ConvTranspose"
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    if cut.port == "in":
        _take_input(graph, node, 1, idx, in_axis)
    elif cut.port == "out":
        _take_input(graph, node, 1, idx, out_axis)
        _take_input(graph, node, 2, idx, 0)
    elif cut.port == "dw":  # one input channel per group, `mult` outputs each
        w = weight_shape(node.inputs[1])
        mult = w[1] if transposed else w[0] // int(node.attrs.get("group", 1))
        rows = (idx[:, None] * mult + np.arange(mult)[None, :]).reshape(-1)
        _take_input(graph, node, 1, idx if transposed else rows, 0)
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
        c = node_input(node, 2)
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
        value = constant_value(t) if not is_empty(t) else None
        if value is None:
            continue
        k = cut.axis - (cut.rank - value.ndim)
        if 0 <= k < value.ndim and value.shape[k] == cut.extent and value.shape[k] != 1:
            set_constant_input(graph, node, i, np.take(value, idx, axis=k))


def _cut_split(graph: gs.Graph, cut: Cut) -> None:
    node = cut.node
    sizes = split_sizes(node, len(cut.keep))
    new, lo = [], 0
    for size in sizes:
        new.append(int(cut.keep[lo:lo + size].sum()))
        lo += size
    if min(new) == 0:
        raise ValueError(f"cutting would empty an output of Split '{node.name}'")
    if "split" in node.attrs:
        node.attrs["split"] = new
    elif node_input(node, 1) is not None:
        set_constant_input(graph, node, 1, np.array(new, dtype=np.int64))
    elif opset(graph) >= 13:
        node.attrs.pop("num_outputs", None)
        node.inputs.append(gs.Constant(fresh_name(graph, (node.name or "split") + "_sizes"), np.array(new, np.int64)))
    else:
        node.attrs["split"] = new


def _cut_slice(graph: gs.Graph, cut: Cut) -> None:
    node = cut.node
    starts, ends, axes, _ = slice_params(graph, node)
    axes = [norm_axis(a, cut.rank) for a in axes] if axes is not None else list(range(len(starts)))
    i = axes.index(cut.axis)
    lo, hi = clamp_range(starts[i], ends[i], len(cut.keep))
    starts, ends = list(starts), list(ends)
    starts[i], ends[i] = int(cut.keep[:lo].sum()), int(cut.keep[:hi].sum())
    if starts[i] == ends[i]:
        raise ValueError(f"cutting would empty the output of Slice '{node.name}'")
    if opset(graph) < 10:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
    else:
        set_constant_input(graph, node, 1, np.array(starts, dtype=constant_value(node.inputs[1]).dtype))
        set_constant_input(graph, node, 2, np.array(ends, dtype=constant_value(node.inputs[2]).dtype))


def _cut_quantize_linear(graph: gs.Graph, cut: Cut) -> None:
    """Per-channel scale and zero point of an activation's QuantizeLinear / DequantizeLinear."""
    idx = cut.indices()
    for index in (1, 2):
        t = node_input(cut.node, index)
        if t is not None and prod(constant_shape(t)) == cut.extent:
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
    "ConvTranspose": _cut_conv,
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
