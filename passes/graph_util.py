"""Small helpers for graph edits shared by passes."""
from __future__ import annotations

import onnx_graphsurgeon as gs


def fresh_name(graph: gs.Graph, name: str) -> str:
    """`name`, or `name_1`, `name_2`, ... — the first that no tensor in `graph` uses."""
    names = graph.tensors().keys()
    candidate, i = name, 1
    while candidate in names:
        candidate, i = f"{name}_{i}", i + 1
    return candidate
