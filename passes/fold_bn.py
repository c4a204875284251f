"""`fold-bn`: fold inference-mode BatchNormalization into a neighbouring linear layer (lossless).

BN is the per-channel affine map y = s·x + t with s = γ / √(σ² + ε), t = β − μ·s.
- Backward, into the Conv/ConvTranspose/Gemm that produces x, directly or through Squeeze/Unsqueeze that keep
  the channel axis: W' = s·W (per output channel), b' = s·b + t.
- Forward, into the Conv (no padding) or Flatten→Gemm that consumes y, when nothing foldable precedes it
  (e.g. Conv→ReLU→BN→Flatten→Gemm): W' = W·s (per input channel), b' = b + W·t.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from squeeze.context import Context
from squeeze.registry import register_pass

from .graph_util import fresh_name
from .im2col import fixed_pads


@register_pass("fold-bn")
def fold_bn(graph: gs.Graph, ctx: Context) -> None:
    """Fold each inference-mode BatchNormalization into the Conv/Gemm before it (or after it)."""
    if not any(n.op == "BatchNormalization" for n in graph.nodes):
        ctx.note("no BatchNormalization nodes in the model")
    folded, kept = fold_all(graph)
    for name, reason in kept:
        ctx.note(f"kept {name or 'BatchNormalization'}: {reason}")
    if folded:
        ctx.note(f"folded {len(folded)} BatchNormalization node(s): {', '.join(folded)}")
    ctx.details["folded"] = folded
    ctx.details["kept"] = len(kept)


def fold_all(graph: gs.Graph) -> tuple[list[str], list[tuple[str, str]]]:
    """Fold every BatchNormalization that can be; returns (names folded, [(name, why not) of the others])."""
    folded, kept = [], []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        reason = _affine(bn)
        if reason is None:
            scale, shift = _scale_shift(bn)
            back = _fold_backward(graph, bn, scale, shift)
            reason = back if back is None else _fold_forward(graph, bn, scale, shift)
            if reason is not None:
                reason = f"{back}; and forward: {reason}"
        if reason:
            kept.append((bn.name, reason))
        else:
            folded.append(bn.name)
    return folded, kept


def _affine(bn: gs.Node) -> str | None:
    """Why `bn` is not a constant per-channel affine map (None if it is)."""
    if bn.attrs.get("training_mode", 0):
        return "training_mode=1"
    if any(t.outputs for t in bn.outputs[1:]):
        return "uses its running-statistics outputs"
    if len(bn.inputs) < 5 or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return "scale/bias/mean/var are not constants"
    return None


def _scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


#: Ops a BatchNormalization folds backward through: they move no element across the channel axis (axis 1), so
#: the per-channel affine map commutes with them (a BN after Conv→Squeeze in a sequence head).
CHANNEL_PRESERVING = ("Squeeze", "Unsqueeze", "Identity")


def _keeps_channel_axis(node: gs.Node) -> bool:
    """Whether a Squeeze/Unsqueeze leaves axis 0 and the channel axis 1 where they are (its axes are all ≥ 2)."""
    if node.op == "Identity":
        return True
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = node.inputs[1].values.reshape(-1).tolist()
    return axes is not None and all(int(a) >= 2 for a in axes)


def _linear_producer(graph: gs.Graph, x: gs.Tensor) -> tuple[gs.Node | None, gs.Node | None, str | None]:
    """(the Conv/ConvTranspose/Gemm that writes `x`, possibly through channel-preserving ops, the node that writes
    `x` itself, why not). Every tensor on the way must have that one reader and not be a graph output."""
    last = None
    for _ in range(8):
        if len(x.inputs) != 1:
            return None, None, "its input is not produced by a node"
        node = x.inputs[0]
        last = last or node
        if len(x.outputs) != 1 or x in graph.outputs:
            return None, None, f"the output of {node.name} is also used elsewhere"
        if node.op in ("Conv", "ConvTranspose", "Gemm"):
            return node, last, None
        if node.op not in CHANNEL_PRESERVING or not _keeps_channel_axis(node):
            return None, None, f"preceded by {node.op}, not Conv/ConvTranspose/Gemm"
        x = node.inputs[0]
    return None, None, "no Conv/ConvTranspose/Gemm within 8 channel-preserving ops"


def _fold_backward(graph: gs.Graph, bn: gs.Node, scale: np.ndarray, shift: np.ndarray) -> str | None:
    producer, last, problem = _linear_producer(graph, bn.inputs[0])
    if producer is None:
        return problem
    reason = _constant_weights(producer, len(scale))
    if reason:
        return reason
    w = producer.inputs[1].values
    w64 = w.astype(np.float64)
    if producer.op == "Conv":
        if w.shape[0] != len(scale):
            return "channel count mismatch"
        new_w = w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif producer.op == "ConvTranspose":  # weight [C_in, C_out/group, k...]
        group = int(producer.attrs.get("group", 1))
        per_group = w.shape[1]
        if per_group * group != len(scale):
            return "channel count mismatch"
        blocks = w64.reshape((group, w.shape[0] // group, per_group) + w.shape[2:])
        new_w = (blocks * scale.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))).reshape(w.shape)
    else:  # Gemm: Y = alpha·A'·B' + beta·C, output features are the columns of B'
        trans_b = int(producer.attrs.get("transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != len(scale):
            return "Gemm output features do not match the BatchNormalization channels"
        new_w = w64 * (scale[:, None] if trans_b else scale[None, :])
    bias = _bias(producer, len(scale))
    if producer.op == "Gemm":
        bias = bias * float(producer.attrs.get("beta", 1.0))
        producer.attrs["beta"] = 1.0
    _set_weights(graph, producer, new_w, bias * scale + shift, w.dtype)
    out = bn.outputs[0]
    bn.outputs.clear()
    last.outputs[0] = out  # the producer (or the Squeeze after it) now writes the BN's output tensor directly
    return None


def _fold_forward(graph: gs.Graph, bn: gs.Node, scale: np.ndarray, shift: np.ndarray) -> str | None:
    y = bn.outputs[0]
    if y in graph.outputs or len(y.outputs) != 1:
        return "its output has several consumers or is a graph output"
    consumer = y.outputs[0]
    spatial = 1
    flatten = None
    if consumer.op == "Flatten" and int(consumer.attrs.get("axis", 1)) == 1:
        flatten, out = consumer, consumer.outputs[0]
        if out in graph.outputs or len(out.outputs) != 1 or out.outputs[0].op != "Gemm":
            return "Flatten is not followed by a single Gemm"
        consumer = out.outputs[0]
        if consumer.inputs[0] is not out or consumer.attrs.get("transA", 0):
            return "Gemm does not take the flattened tensor as its (untransposed) first input"
    elif consumer.op not in ("Conv", "Gemm") or consumer.inputs[0] is not y:
        return f"followed by {consumer.op}, not Conv/Gemm/Flatten→Gemm"
    reason = _constant_weights(consumer, None)
    if reason:
        return reason
    w = consumer.inputs[1].values
    w64 = w.astype(np.float64)
    channels = len(scale)
    if consumer.op == "Conv":
        pads = fixed_pads(consumer, w.ndim - 2)
        if pads is None or any(pads):
            return "the following Conv pads its input (padding would see the shift)"
        group = int(consumer.attrs.get("group", 1))
        per_group = w.shape[1]
        if per_group * group != channels:
            return "channel count mismatch"
        # input channel of weight [o, j] is (o // (M/group)) * per_group + j
        in_channel = (np.arange(w.shape[0])[:, None] // (w.shape[0] // group)) * per_group + np.arange(per_group)[None, :]
        s = scale[in_channel].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        t = shift[in_channel].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        new_w = w64 * s
        extra = (w64 * t).reshape(w.shape[0], -1).sum(axis=1)
    else:
        trans_b = int(consumer.attrs.get("transB", 0))
        mat = w64.T if trans_b else w64  # [K, N]
        if mat.shape[0] % channels:
            return "Gemm input features are not a multiple of the channels"
        spatial = mat.shape[0] // channels
        if flatten is None and spatial != 1:
            return "Gemm input features do not match the channels"
        s = np.repeat(scale, spatial)[:, None]
        t = np.repeat(shift, spatial)[:, None]
        alpha = float(consumer.attrs.get("alpha", 1.0))
        new_mat = mat * s
        extra = alpha * (mat * t).sum(axis=0)
        new_w = new_mat.T if trans_b else new_mat
    bias = _bias(consumer, w.shape[0] if consumer.op == "Conv" else len(extra))
    if consumer.op == "Gemm":
        bias = bias * float(consumer.attrs.get("beta", 1.0))
        consumer.attrs["beta"] = 1.0
    _set_weights(graph, consumer, new_w, bias + extra, w.dtype)
    # Bypass the BN: whoever read its output now reads its input.
    x = bn.inputs[0]
    for node in list(y.outputs):
        node.inputs[node.inputs.index(y)] = x
    bn.outputs.clear()
    return None


def _constant_weights(node: gs.Node, channels: int | None) -> str | None:
    if not isinstance(node.inputs[1], gs.Constant):
        return f"{node.name} has a non-constant weight"
    if len(node.inputs) > 2 and node.inputs[2].name:
        if not isinstance(node.inputs[2], gs.Constant):
            return f"{node.name} has a non-constant bias"
        out_features = channels or node.inputs[2].values.size
        if node.inputs[2].values.size not in (1, out_features) or node.inputs[2].values.ndim > 2:
            return f"{node.name} has a bias that is not per-channel"
    return None


def _bias(node: gs.Node, channels: int) -> np.ndarray:
    """The node's bias as a per-channel vector (a scalar bias is broadcast; absent means zero)."""
    if len(node.inputs) > 2 and node.inputs[2].name:
        return np.broadcast_to(node.inputs[2].values.astype(np.float64).reshape(-1), (channels,)).copy()
    return np.zeros(channels)


def _set_weights(graph: gs.Graph, node: gs.Node, weight: np.ndarray, bias: np.ndarray, dtype) -> None:
    """Give `node` new weight and bias constants (fresh tensors: a shared original stays untouched)."""
    node.inputs[1] = gs.Constant(fresh_name(graph, node.inputs[1].name + "_bnfolded"), weight.astype(dtype))
    b = gs.Constant(fresh_name(graph, (node.name or node.op) + "_bias_bnfolded"), bias.astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = b
    else:
        node.inputs.append(b)
