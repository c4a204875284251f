"""Which channels are coupled: `channel_groups(graph)` (after Torch-Pruning, Fang et al. 2023, "DepGraph").

Every Conv/ConvTranspose/Gemm/MatMul output opens a *channel space*; a rule per op type (`RULES`: one line per op
where the rule is a pattern — same index for activations, pooling and BN; elementwise; reductions — and one small
function where the op moves channels: offsets for Concat/Split/Slice, H×W-expansion for Flatten/Reshape, a moved
axis for Transpose) says how a tensor's channels flow through the op. An elementwise op between two traced tensors
(a residual Add) joins their spaces into one *group*. Whatever the analysis cannot prove safe (an op without a
rule, a graph output, a Shape that reads the channel count, a non-constant weight) blocks the group, and the
reason is kept. Cutting is `cutting.py`; which channels to cut, `channel_plan.py` and the passes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from squeeze.model import to_graph
from squeeze.registry import provides

from .channel_space import Analysis, Group, Layout, Segment, groups_of, sub_layout
from .cutting import cut_problem
from .graph_util import (clamp_range, constant_shape, constant_value, infer_shapes, is_empty, node_input, norm_axis,
                         opset, prod, slice_params, split_sizes, topological_order, weight_shape)


def _unknown(an: Analysis, node: gs.Node) -> None:
    for t in node.inputs:
        an.block(an.layout(t), f"it reaches {node.op} '{an.label(node)}', which has no channel rule")


def _pass(an: Analysis, node: gs.Node, layout: Layout, out: Layout | None = None) -> None:
    """The ending of every pass-through rule: the first input's channels flow to the first output (as `out`, when
    the op moves the channel axis)."""
    an.member(node, "pass", node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout if out is None else out)


def _same(an: Analysis, node: gs.Node) -> None:
    """Elementwise unary ops (and Identity, Cast, Clip with scalar bounds, ...): channels pass unchanged."""
    layout = an.layout(node.inputs[0]) if node.inputs else None
    if layout is None:
        return
    _pass(an, node, layout)


def _dropout(an: Analysis, node: gs.Node) -> None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        _unknown(an, node)
        an.block(an.layout(node.inputs[0]), f"the mask output of Dropout '{an.label(node)}' is used")
        return
    _same(an, node)


def _elementwise(an: Analysis, node: gs.Node) -> None:
    """Add/Sub/Mul/Div/PRelu/...: traced inputs are coupled (residual Add), broadcast constants are cut along."""
    out = node.outputs[0]
    rank = an.rank(out)
    carried, free, consts = [], [], []
    for i, t in enumerate(node.inputs):
        if is_empty(t):
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


def _conv(an: Analysis, node: gs.Node) -> None:
    """Conv (weight [M, C/group, k...]) and ConvTranspose (weight [C, M/group, k...]): input channels are read
    (`in`), a new space is written (`out`); depthwise convs pass channels through."""
    x, out = node.inputs[0], node.outputs[0]
    w = weight_shape(node.inputs[1])
    where = f"{node.op} '{an.label(node)}'"
    bias = node_input(node, 2)
    if w is None or (bias is not None and weight_shape(bias) is None):
        an.block(an.layout(x), f"{where} has a non-constant weight or bias")
        shape = an.shape(out)
        an.opaque(out, 1, shape[1] if shape and len(shape) > 1 else None, f"{where} has a non-constant weight or bias")
        return
    group = int(node.attrs.get("group", 1))
    transposed = node.op == "ConvTranspose"
    in_axis, out_axis = (0, 1) if transposed else (1, 0)  # the weight's input and output channel axes
    channels, outputs = (int(w[0]), int(w[1]) * group) if transposed else (int(w[1]) * group, int(w[0]))
    layout = an.require(x, 1, channels)
    macs = an.macs(node)
    bad_axis = layout.axis != 1 or layout.outer != 1 or layout.extent != channels
    if bad_axis:
        an.block(layout, f"the channels are not on the input channel axis of {where}")
    if group > 1 and channels == group and outputs % group == 0 and not bad_axis:
        an.member(node, "dw", x, layout, macs)
        problem = cut_problem(node, [(1, 0), (2, 0)], where)
        if problem:
            an.block(layout, problem)
        an.set_layout(out, replace(layout, inner=layout.inner * (outputs // group)))
        return
    if group > 1:
        reason = f"{where} is a grouped convolution (group={group}, {channels // group} channels per group)"
        an.block(layout, reason)
        an.opaque(out, 1, outputs, reason)
        return
    if not bad_axis:
        an.member(node, "in", x, layout, macs)
        problem = cut_problem(node, [(1, in_axis)], where)
        if problem:
            an.block(layout, problem)
    out_space = an.new_space(outputs, cut_problem(node, [(1, out_axis), (2, 0)], where))
    out_layout = Layout(1, (Segment(out_space, 0, outputs),))
    an.member(node, "out", out, out_layout, macs)
    an.set_layout(out, out_layout)


def _gemm(an: Analysis, node: gs.Node) -> None:
    """Gemm with a constant B: A's features are read (`in`, via Flatten: H×W per channel), B's columns written."""
    a, out = node.inputs[0], node.outputs[0]
    b = weight_shape(node.inputs[1])
    c = node_input(node, 2)
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
        problem = cut_problem(node, [(1, 1 if trans_b else 0)], where)
        if problem:
            an.block(layout, problem)
    c_shape = weight_shape(c) if c is not None else None
    c_cut = [(2, len(c_shape) - 1)] if c_shape and c_shape[-1] == n and n > 1 else []
    out_space = an.new_space(n, cut_problem(node, [(1, 0 if trans_b else 1)] + c_cut, where))
    out_layout = Layout(1, (Segment(out_space, 0, n),))
    an.member(node, "out", out, out_layout, macs)
    an.set_layout(out, out_layout)


def _matmul(an: Analysis, node: gs.Node) -> None:
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
        problem = cut_problem(node, [(1, 0)], where)
        if problem:
            an.block(layout, problem)
    out_layout = Layout(rank_out - 1, (Segment(an.new_space(n, cut_problem(node, [(1, 1)], where)), 0, n),))
    an.member(node, "out", out, out_layout, macs)
    an.set_layout(out, out_layout)


def _norm(an: Analysis, node: gs.Node) -> None:
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
    if layout.axis != 1 or any(prod(p) != layout.extent for p in params):
        an.block(layout, f"the channels are not on the normalised axis of {where}")
        return
    an.member(node, "param", x, layout)
    an.set_layout(node.outputs[0], layout)


def _pool(an: Analysis, node: gs.Node) -> None:
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
    _pass(an, node, layout)


def _pad(an: Analysis, node: gs.Node) -> None:
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"Pad '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    pads = node.attrs.get("pads") if opset(an.graph) < 11 else (
        constant_value(node.inputs[1]) if node_input(node, 1) is not None else None)
    axes_t = node_input(node, 3)
    axes = constant_value(axes_t) if axes_t is not None else None
    if pads is None or rank is None or (axes_t is not None and axes is None):
        an.block(layout, f"{where} has non-constant pads")
        return
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = [norm_axis(int(a), rank) for a in axes] if axes is not None else list(range(rank))
    if layout.axis in axes:
        i = axes.index(layout.axis)
        if pads[i] != 0 or pads[i + len(axes)] != 0:
            an.block(layout, f"{where} pads the channel axis")
            return
    _pass(an, node, layout)


def _resize(an: Analysis, node: gs.Node) -> None:
    """Resize/Upsample: a scale of 1 on the channel axis passes channels; `sizes` is rewritten when cut."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"{node.op} '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    axes = node.attrs.get("axes")
    axes = [norm_axis(int(a), rank) for a in axes] if axes is not None and rank else list(range(rank or 0))
    if node.op == "Upsample" and "scales" in node.attrs:
        scales, sizes = np.asarray(node.attrs["scales"]), None
    elif node.op == "Upsample" or opset(an.graph) < 11:
        scales, sizes = constant_value(node.inputs[1]) if node_input(node, 1) is not None else None, None
    else:
        scales = constant_value(node.inputs[2]) if node_input(node, 2) is not None else None
        sizes = constant_value(node.inputs[3]) if node_input(node, 3) is not None else None
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


def _flatten(an: Analysis, node: gs.Node) -> None:
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
    k = norm_axis(int(node.attrs.get("axis", 1)), len(dims))
    a = layout.axis
    if a < k:
        an.block(layout, f"{where} merges the channels into its first output axis")
        return
    out_layout = Layout(1, layout.segments, layout.inner * prod(dims[a + 1:]), layout.outer * prod(dims[k:a]))
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
            return b, prod(src[j:axis]), prod(src[axis + 1:k])
        lo = hi
    return None


def _reshape(an: Analysis, node: gs.Node) -> None:
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


def _transpose(an: Analysis, node: gs.Node) -> None:
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
    _pass(an, node, layout, replace(layout, axis=perm.index(layout.axis)))


def _axes(an: Analysis, node: gs.Node, input_index: int, rank: int | None) -> list[int] | None:
    """An op's `axes`, from the attribute (older opsets) or a constant input; None if unknown."""
    if "axes" in node.attrs:
        values = node.attrs["axes"]
    elif node_input(node, input_index) is not None:
        values = constant_value(node.inputs[input_index])
        if values is None:
            return None
    else:
        return []
    if rank is None:
        return None
    return sorted(norm_axis(int(a), rank) for a in np.asarray(values).reshape(-1))


def _squeeze(an: Analysis, node: gs.Node) -> None:
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
    _pass(an, node, layout, replace(layout, axis=layout.axis - sum(a < layout.axis for a in axes)))


def _unsqueeze(an: Analysis, node: gs.Node) -> None:
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank_out = an.rank(node.outputs[0])
    axes = _axes(an, node, 1, rank_out)
    if axes is None or rank_out is None:
        an.block(layout, f"the axes of Unsqueeze '{an.label(node)}' are unknown")
        return
    kept = [i for i in range(rank_out) if i not in axes]
    _pass(an, node, layout, replace(layout, axis=kept[layout.axis]))


def _reduce(an: Analysis, node: gs.Node) -> None:
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
    _pass(an, node, layout, replace(layout, axis=axis))


def _softmax(an: Analysis, node: gs.Node) -> None:
    """Softmax-like ops normalise across an axis: channels pass only if it is another axis."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank = an.rank(node.inputs[0])
    if rank is None:
        an.block(layout, f"the rank around {node.op} '{an.label(node)}' is unknown")
        return
    if opset(an.graph) < 13:  # coerced to 2-D at `axis`: every axis from `axis` on is normalised together
        axis = norm_axis(int(node.attrs.get("axis", 1)), rank)
        couples = layout.axis >= axis
    else:
        couples = layout.axis == norm_axis(int(node.attrs.get("axis", -1)), rank)
    if couples:
        an.block(layout, f"{node.op} '{an.label(node)}' normalises across the channels")
        return
    _pass(an, node, layout)


def _concat(an: Analysis, node: gs.Node) -> None:
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
    axis = norm_axis(int(node.attrs.get("axis", 0)), rank)
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


def _split(an: Analysis, node: gs.Node) -> None:
    """Split along the channels gives each output its range of channels; the sizes are rewritten when cut."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"Split '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    if rank is None:
        an.block(layout, f"the rank around {where} is unknown")
        return
    axis = norm_axis(int(node.attrs.get("axis", 0)), rank)
    if axis != layout.axis:
        an.member(node, "pass", node.inputs[0], layout)
        for out in node.outputs:
            an.set_layout(out, layout)
        return
    sizes = split_sizes(node, layout.extent)
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


def _slice(an: Analysis, node: gs.Node) -> None:
    """Slice with step 1 along the channels keeps a range of channels; its bounds are rewritten when cut."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    where = f"Slice '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    params = slice_params(an.graph, node)
    if params is None or rank is None:
        an.block(layout, f"{where} has non-constant bounds")
        return
    starts, ends, axes, steps = params
    axes = [norm_axis(a, rank) for a in (axes if axes is not None else range(len(starts)))]
    if layout.axis not in axes:
        _pass(an, node, layout)
        return
    i = axes.index(layout.axis)
    if (steps is not None and steps[i] != 1) or layout.inner != 1 or layout.outer != 1:
        an.block(layout, f"{where} takes every n-th channel or slices merged channels")
        return
    lo, hi = clamp_range(starts[i], ends[i], layout.width)
    part = sub_layout(layout, lo, hi)
    an.member(node, "slice", node.inputs[0], layout)
    an.parts.extend((s.space, s.start, s.length) for s in part.segments)
    an.set_layout(node.outputs[0], part)


def _shape(an: Analysis, node: gs.Node) -> None:
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
        dims = [norm_axis(int(i), rank - start) + norm_axis(start, rank) for i in indices.reshape(-1)]
        if layout.axis in dims:
            safe = False
            break
    if not safe:
        an.block(layout, f"its shape is read by Shape '{an.label(node)}'")


def _quantize_linear(an: Analysis, node: gs.Node) -> None:
    """QuantizeLinear / DequantizeLinear of an activation (the QDQ pairs `quant` puts before a layer): a per-tensor
    scale passes the channels; per-channel scales on the channel axis are cut along (port `param`)."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return  # a weight's DequantizeLinear, or an untraced tensor
    where = f"{node.op} '{an.label(node)}'"
    rank = an.rank(node.inputs[0])
    params = [node_input(node, i) for i in (1, 2)]
    shapes = [constant_shape(t) if t is not None else () for t in params]
    if any(s is None for s in shapes):
        an.block(layout, f"{where} has a computed scale or zero point")
        return
    if int(node.attrs.get("block_size", 0) or 0):
        an.block(layout, f"{where} is block-quantized")
        return
    port = "pass"
    if any(prod(s) > 1 for s in shapes):
        axis = norm_axis(int(node.attrs.get("axis", 1)), rank) if rank is not None else None
        if axis is None or (axis == layout.axis and any(prod(s) != layout.extent for s in shapes if prod(s) > 1)):
            an.block(layout, f"the scales of {where} do not line up with the channels")
            return
        if axis == layout.axis:
            port = "param"
    an.member(node, port, node.inputs[0], layout)
    an.set_layout(node.outputs[0], layout)


def _layer_norm(an: Analysis, node: gs.Node) -> None:
    """LayerNormalization normalises over the axes from `axis` on: channels there are coupled by the statistics
    (a transformer's residual stream is not prunable); channels on an earlier axis pass unchanged."""
    layout = an.layout(node.inputs[0])
    if layout is None:
        return
    rank = an.rank(node.inputs[0])
    if rank is None or layout.axis >= norm_axis(int(node.attrs.get("axis", -1)), rank):
        an.block(layout, f"{node.op} '{an.label(node)}' normalises across the channels")
        return
    _pass(an, node, layout)


def _size(an: Analysis, node: gs.Node) -> None:
    an.block(an.layout(node.inputs[0]), f"its element count is read by Size '{an.label(node)}'")


Rule = Callable[[Analysis, gs.Node], None]


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
    "ConvTranspose": _conv,
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


@provides("inspect-channels")
def describe_model(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """`squeeze inspect`: the channel groups of `model` as text (see `describe`)."""
    return describe(channel_groups(to_graph(model), input_shapes))


def channel_groups(graph: gs.Graph, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[Group]:
    """The groups of channels that must be removed together, each prunable or with the reasons it is not.

    The graph is not modified. `input_shapes` fixes dynamic input dimensions for shape inference (a dynamic
    leading batch dimension is taken as 1 otherwise). Groups describe the graph as it is now: after cutting,
    analyse again.
    """
    an = Analysis(graph, infer_shapes(graph, input_shapes), RULES)
    for node in topological_order(graph):
        RULES.get(node.op, _unknown)(an, node)
    for out in graph.outputs:
        an.block(an.layout(out), f"it reaches the graph output '{out.name}'")
    return groups_of(an)


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
