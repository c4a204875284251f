"""Graph helpers shared by passes: constant and weight values, shapes, node order and names, small edits."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from squeeze.model import export_without_weights

from .weights import compressed_value, replace_compressed


def fresh_name(graph: gs.Graph, name: str) -> str:
    """`name`, or `name_1`, `name_2`, ... — the first that no tensor in `graph` uses."""
    names = graph.tensors().keys()
    candidate, i = name, 1
    while candidate in names:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


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


def is_empty(tensor: gs.Tensor | None) -> bool:
    return tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name)


def node_input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and not is_empty(node.inputs[index]) else None


def prod(values: Iterable[int]) -> int:
    return int(np.prod(list(values), dtype=np.int64))


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


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def opset(graph: gs.Graph) -> int:
    return int(graph.opset or 13)


def split_sizes(node: gs.Node, width: int) -> list[int] | None:
    """A Split's output sizes: the `split` attribute (opset < 13), the constant input, or equal parts."""
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    if node_input(node, 1) is not None:
        value = constant_value(node.inputs[1])
        return None if value is None else [int(s) for s in value.reshape(-1)]
    parts = int(node.attrs.get("num_outputs", len(node.outputs)))
    step = -(-width // parts)
    return [min(step, width - i * step) for i in range(parts)]


def slice_params(graph: gs.Graph, node: gs.Node):
    if opset(graph) < 10:
        attrs = node.attrs
        if "starts" not in attrs:
            return None
        return ([int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]],
                None if "axes" not in attrs else [int(v) for v in attrs["axes"]], None)
    values = []
    for index in (1, 2, 3, 4):
        t = node_input(node, index)
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


def clamp_range(start: int, end: int, width: int) -> tuple[int, int]:
    start = start + width if start < 0 else start
    end = end + width if end < 0 else end
    return min(max(start, 0), width), min(max(end, 0), width)


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


def nearest_to_outputs(graph: gs.Graph, nodes: Iterable[gs.Node]) -> list[gs.Node]:
    """Those of `nodes` that some graph output reads without another of `nodes` between: walking back from every
    graph output through the producers of each input, the first of `nodes` met on each path (a classifier's last
    Gemm, a detector's head convs). In graph order; the graph is not modified."""
    wanted = {id(n) for n in nodes}
    producers = {id(t): n for n in graph.nodes for t in n.outputs}
    found: set[int] = set()
    seen: set[int] = set()
    stack = [producers.get(id(t)) for t in graph.outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in wanted:
            found.add(id(node))
            continue
        stack.extend(producers.get(id(t)) for t in node.inputs)
    return [n for n in graph.nodes if id(n) in found]


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
    put_input(node, index, gs.Constant(fresh_name(graph, base + "_pruned"), values))


def put_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """`tensor` as input `index` of `node`, appended (after empty placeholders) when that optional input is absent."""
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)
