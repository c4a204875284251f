"""`fold-bn`: fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it (lossless).

y = γ (x − μ) / √(σ² + ε) + β with x = W·a + b becomes y = (s·W)·a + s(b − μ) + β, s = γ / √(σ² + ε).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from squeeze.context import Context
from squeeze.registry import register_pass

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


@register_pass("fold-bn")
def fold_bn(graph: gs.Graph, ctx: Context) -> None:
    """Fold each inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm before it."""
    norms = [n for n in graph.nodes if n.op == "BatchNormalization"]
    if not norms:
        ctx.note("no BatchNormalization nodes in the model")
    folded = 0
    for bn in norms:
        reason = _fold(graph, bn)
        if reason:
            ctx.note(f"kept {bn.name or 'BatchNormalization'}: {reason}")
        else:
            folded += 1
    ctx.details["folded"] = folded
    ctx.details["kept"] = len(norms) - folded


def _fold(graph: gs.Graph, bn: gs.Node) -> str | None:
    """Fold `bn` into its producer; return why not, or None on success."""
    if bn.attrs.get("training_mode", 0):
        return "training_mode=1"
    if len(bn.outputs) > 1 and any(t.outputs or t in graph.outputs for t in bn.outputs[1:]):
        return "uses its running-statistics outputs"
    params = bn.inputs[1:5]
    if len(params) < 4 or not all(isinstance(t, gs.Constant) for t in params):
        return "scale/bias/mean/var are not constants"
    x = bn.inputs[0]
    if len(x.inputs) != 1:
        return "input is not produced by a node"
    producer = x.inputs[0]
    if producer.op not in FOLDABLE:
        return f"preceded by {producer.op}, not Conv/ConvTranspose/Gemm"
    if len(x.outputs) != 1 or x in graph.outputs:
        return f"the output of {producer.name} is also used elsewhere"
    weight = producer.inputs[1]
    if not isinstance(weight, gs.Constant):
        return f"{producer.name} has a non-constant weight"
    if len(producer.inputs) > 2 and not isinstance(producer.inputs[2], gs.Constant):
        return f"{producer.name} has a non-constant bias"
    if len(producer.inputs) > 2 and producer.inputs[2].values.size not in (1, len(params[0].values)):
        return f"{producer.name} has a bias that is not per-channel"
    gamma, beta, mean, var = (p.values.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    shift = beta - mean * scale
    w = weight.values
    w64 = w.astype(np.float64)
    channels = len(scale)
    if producer.op == "Conv":
        if w.shape[0] != channels:
            return "channel count mismatch"
        new_w = w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif producer.op == "ConvTranspose":
        group = int(producer.attrs.get("group", 1))
        per_group = w.shape[1]
        if per_group * group != channels:
            return "channel count mismatch"
        blocks = w64.reshape((group, w.shape[0] // group, per_group) + w.shape[2:])
        new_w = (blocks * scale.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))).reshape(w.shape)
    else:  # Gemm: Y = alpha·A'·B' + beta·C; the output features are B' columns
        trans_b = int(producer.attrs.get("transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != channels or x.shape is None or len(x.shape or []) != 2:
            return "Gemm output is not [N, channels]"
        new_w = w64 * (scale[:, None] if trans_b else scale[None, :])
    bias = _bias(producer, channels)
    if producer.op == "Gemm":
        bias = bias * float(producer.attrs.get("beta", 1.0))
        producer.attrs["beta"] = 1.0
    new_b = bias * scale + shift
    dtype = w.dtype
    producer.inputs[1] = gs.Constant(_fresh(graph, weight.name + "_bnfolded"), new_w.astype(dtype))
    b_const = gs.Constant(_fresh(graph, (producer.name or "node") + "_bias_bnfolded"), new_b.astype(dtype))
    if len(producer.inputs) > 2:
        producer.inputs[2] = b_const
    else:
        producer.inputs.append(b_const)
    # The producer now writes the BN's output tensor directly.
    out = bn.outputs[0]
    bn.outputs.clear()
    producer.outputs[0] = out
    return None


def _bias(node: gs.Node, channels: int) -> np.ndarray:
    """The producer's bias as a per-channel vector (a scalar bias is broadcast; absent means zero)."""
    if len(node.inputs) > 2:
        return np.broadcast_to(node.inputs[2].values.astype(np.float64).reshape(-1), (channels,)).copy()
    return np.zeros(channels)


def _fresh(graph: gs.Graph, name: str) -> str:
    names = set(graph.tensors().keys())
    candidate, i = name, 1
    while candidate in names:
        candidate, i = f"{name}_{i}", i + 1
    return candidate
