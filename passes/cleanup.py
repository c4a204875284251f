"""`cleanup`: lossless graph tidying — constant folding, Identity/Dropout removal, dead-node removal, toposort."""
from __future__ import annotations

from typing import Annotated

import onnx_graphsurgeon as gs

from squeeze.context import Context
from squeeze.registry import Range, register_pass


@register_pass("cleanup")
def cleanup(graph: gs.Graph, ctx: Context, *,
            fold_constants: Annotated[bool, "evaluate subgraphs whose inputs are all constants"] = True,
            max_folded_mb: Annotated[float, Range(0, None), "do not fold results larger than this (MB)"] = 16.0
            ) -> None:
    """Fold constants, drop Identity and inference-mode Dropout, remove dead nodes (lossless)."""
    nodes_before = len(graph.nodes)
    removed = {"Identity": 0, "Dropout": 0}
    for node in list(graph.nodes):
        if node.op in removed and _bypass(graph, node):
            removed[node.op] += 1
    for op, count in removed.items():
        if count:
            ctx.note(f"removed {count} {op} node(s)")
    graph.cleanup(remove_unused_graph_inputs=False)
    if fold_constants:
        constant_nodes = sum(1 for n in graph.nodes if n.op == "Constant")
        count_before = len(graph.nodes)
        graph.fold_constants(size_threshold=int(max_folded_mb * 2**20), error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False)
        folded = count_before - len(graph.nodes)
        if folded:
            ctx.note(f"folded {folded} node(s) into constants ({constant_nodes} were Constant nodes)")
    dead = nodes_before - len(graph.nodes) - sum(removed.values())
    ctx.details["nodes"] = {"before": nodes_before, "after": len(graph.nodes)}
    if dead > 0:
        ctx.note(f"{dead} node(s) removed as dead or folded in total")


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Reconnect the consumers of `node`'s first output to its first input; False when that is unsafe."""
    if node.op == "Dropout":
        if len(node.outputs) > 1 and node.outputs[1].outputs:  # the mask is used downstream
            return False
        if node.attrs.get("training_mode") or (len(node.inputs) > 2 and _truthy_constant(node.inputs[2])):
            return False
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        # Keep the graph's output name: rename the source tensor, if it is an ordinary intermediate tensor.
        if src in graph.inputs or src in graph.outputs or isinstance(src, gs.Constant) or len(src.outputs) > 1:
            return False
        index = graph.outputs.index(dst)
        name = dst.name
        dst.name = name + "__bypassed"
        src.name = name
        src.dtype, src.shape = dst.dtype or src.dtype, dst.shape or src.shape
        graph.outputs[index] = src
    else:
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
    node.outputs.clear()
    node.inputs.clear()  # a bypassed node must not count as a consumer of `src` (see the graph-output case)
    return True


def _truthy_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant) and bool(tensor.values.any())
