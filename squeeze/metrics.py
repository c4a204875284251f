"""Measured model metrics: parameter count, multiply-accumulates per node, tensor shapes.

MACs are counted from shapes for the ops that do the arithmetic (Conv incl. grouped/depthwise, ConvTranspose,
Gemm, MatMul); every other op counts as zero and is listed by type, so the report says what was not counted.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from .data import input_specs, synthesize
from .model import without_weights

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
                 onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of weight-like tensors (float and 8/4-bit initializers and Constant nodes; not int64 shapes)."""
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in _WEIGHT_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _WEIGHT_TYPES:
                    total += int(np.prod(attr.t.dims))
    return total


def tensor_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every tensor, from ONNX shape inference with the given input shapes (ORT fills gaps)."""
    fixed = without_weights(model)[0]  # shapes need no weight bytes (and a model over 2 GB cannot be inferred)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for d, n in zip(dims, input_shapes[value.name]):
                d.Clear()
                d.dim_value = n
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # inference is best effort here; ORT fills the gaps below
        inferred = fixed
    shapes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for value in list(g.input) + list(g.value_info) + list(g.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape") \
                and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    missing = [o for n in g.node if n.op_type in MAC_OPS for o in list(n.input) + list(n.output)
               if o and o not in shapes]
    if missing:
        shapes.update(_shapes_from_ort(model, input_shapes, sorted(set(missing))))
    return shapes


def _shapes_from_ort(model, input_shapes, names) -> dict[str, tuple[int, ...]]:
    from .runtime import activations  # local: runtime imports data, which this module imports too
    data = synthesize(input_specs(model), input_shapes, 1, seed=0)
    try:
        values = activations(model, data, names)
    except Exception:
        return {}
    stacked = all(data.stacked.values())
    return {n: tuple(v.shape) if stacked else tuple(v.shape[1:]) for n, v in values.items()}


def node_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], dict[str, int]]:
    """(MACs per counted node name, count of nodes per op type that were not counted)."""
    shapes = tensor_shapes(model, input_shapes)
    macs: dict[str, int] = {}
    uncounted: Counter[str] = Counter()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type not in MAC_OPS:
            uncounted[node.op_type] += 1
            continue
        value = _macs_of(node, shapes)
        if value is None:
            uncounted[node.op_type + " (shape unknown)"] += 1
        else:
            macs[name] = value
    return macs, dict(uncounted)


def _macs_of(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    ins = [shapes.get(n) for n in node.input]
    out = shapes.get(node.output[0])
    if any(s is None for s in ins[:2]) or out is None:
        return None
    if node.op_type == "Conv":
        w = ins[1]  # [M, C/group, k...]
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        x, w = ins[0], ins[1]  # w: [C, M/group, k...]; every input element meets M/group * k... weights
        return int(np.prod(x)) * int(np.prod(w[1:]))
    if node.op_type == "Gemm":
        a = ins[0]
        if len(a) != 2:  # Gemm takes 2-D inputs; a model that breaks that is refused later, not here
            return None
        k = a[0] if attrs.get("transA", 0) else a[1]
        return int(np.prod(out)) * int(k)
    if node.op_type == "MatMul":
        a = ins[0]
        k = a[-1]
        return int(np.prod(out)) * int(k)
    return None


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def summary(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Params, serialized bytes, total MACs, MACs per node and the op types not counted."""
    per_node, uncounted = node_macs(model, input_shapes)
    return {
        "params": count_params(model),
        "macs": int(sum(per_node.values())),
        "macs_per_node": per_node,
        "macs_not_counted": uncounted,
        "nodes": len(model.graph.node),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
    }
