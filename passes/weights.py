"""Weight-layer helpers shared by the quantization passes (`quant`, `codebook`).

- `find_layers` / `select_layers`: the Conv, ConvTranspose, Gemm and MatMul nodes with a weight, and the `skip`
  list a user gives (node names, op types, fnmatch patterns, or `first` / `last`).
- `Layer.matrix` / `Layer.from_matrix`: every weight as [groups, outputs per group, inputs per output], the
  view in which a layer is Y = X·Wᵀ, so rounding and least-squares refits are written once for all layer types.
- `calibrate`: one pass over the calibration data that samples each layer's input rows X (im2col patches for a
  convolution) and hands every chunk of activations to a callback (activation statistics).
- `Builder`: fresh names, and the standard ONNX ops that rebuild a weight from bit-packed indices (Cast, Gather,
  Add, Mul, Div, Sub, Reshape, Slice) — opset-aware, so ONNX Runtime and TVM both run them (TVM folds them away).
- `upgrade_opset`: raise a graph's opset with onnx.version_converter (per-channel QDQ needs opset 13).
"""
from __future__ import annotations

import fnmatch
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from squeeze import runtime
from squeeze.codec import pack_bits, unpack_bits
from squeeze.data import Dataset
from squeeze.errors import PassError

from .im2col import conv_windows, window_rows

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---------------------------------------------------------------------------------------------- layers

@dataclass
class Layer:
    """A node that multiplies its input by a weight: which input is the weight and how to view it as a matrix."""

    node: gs.Node
    weight_index: int

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def weight(self) -> gs.Tensor:
        return self.node.inputs[self.weight_index]

    @property
    def values(self) -> np.ndarray | None:
        """The weight array when it is a float constant (None when it is computed, e.g. already compressed)."""
        w = self.weight
        if isinstance(w, gs.Constant) and np.issubdtype(w.values.dtype, np.floating):
            return w.values
        return None

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The weight's shape when known (a computed weight may have none)."""
        shape = self.weight.shape
        return tuple(shape) if shape is not None and all(isinstance(d, int) for d in shape) else None

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[1 - self.weight_index if self.op == "MatMul" else 0]

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.op in ("Conv", "ConvTranspose") else 1

    @property
    def out_axis(self) -> int:
        """The weight axis that indexes output channels (per-channel quantization axis)."""
        if self.op == "ConvTranspose":
            return 1
        if self.op == "Gemm":
            return 0 if self.node.attrs.get("transB", 0) else 1
        if self.op == "MatMul":
            return len(self.shape or (0, 0)) - 1
        return 0

    @property
    def kernel_size(self) -> int:
        """Elements per (output, input) kernel: k×k for a 2-D convolution, 1 otherwise."""
        if self.op not in ("Conv", "ConvTranspose") or self.shape is None:
            return 1
        return int(np.prod(self.shape[2:]))

    @property
    def has_matrix(self) -> bool:
        """Whether Y = X·Wᵀ is available here (2-D Conv, Gemm with constant B, 2-D MatMul weight)."""
        shape = self.shape
        if shape is None:
            return False
        if self.op == "Conv":
            return len(shape) == 4
        if self.op == "Gemm":
            return self.weight_index == 1
        if self.op == "MatMul":
            return self.weight_index == 1 and len(shape) == 2
        return False

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """[groups, outputs per group, inputs per output] view of weight `w` (a copy for Gemm/MatMul)."""
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.op == "Gemm" and self.node.attrs.get("transB", 0):
            return w[None]
        return w.T[None]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        shape = self.shape
        if self.op == "Conv":
            return m.reshape(shape)
        if self.op == "Gemm" and self.node.attrs.get("transB", 0):
            return m[0]
        return np.ascontiguousarray(m[0].T)

    def output_scale(self) -> float:
        """Gemm's alpha (outputs are alpha·X·Wᵀ); 1 for the others."""
        return float(self.node.attrs.get("alpha", 1.0)) if self.op == "Gemm" else 1.0

    @property
    def out_count(self) -> int:
        """Number of output channels (features)."""
        shape = self.shape or self.values.shape
        if self.op == "ConvTranspose":
            return int(shape[1]) * self.groups
        return int(shape[self.out_axis])

    def bias(self) -> np.ndarray | None:
        """The per-output bias as seen at the output (Gemm: beta·C), zeros if absent; None if not adjustable."""
        if self.op in ("MatMul", "ConvTranspose") or (self.op == "Gemm" and self.weight_index != 1):
            return None
        count = self.out_count
        if len(self.node.inputs) > 2 and self.node.inputs[2].name:
            b = self.node.inputs[2]
            if not isinstance(b, gs.Constant) or b.values.size not in (1, count):
                return None
            beta = float(self.node.attrs.get("beta", 1.0)) if self.op == "Gemm" else 1.0
            return np.broadcast_to(b.values.astype(np.float64).ravel() * beta, (count,)).copy()
        return np.zeros(count)

    def set_bias(self, builder: "Builder", values: np.ndarray, dtype) -> None:
        """Give the node a fresh per-output bias constant (Gemm: beta set to 1)."""
        b = builder.const((self.name or self.op) + "_bias_corrected", values.astype(dtype))
        if self.op == "Gemm":
            self.node.attrs["beta"] = 1.0
        if len(self.node.inputs) > 2:
            self.node.inputs[2] = b
        else:
            self.node.inputs.append(b)


def find_layers(graph: gs.Graph) -> list[Layer]:
    """Every Conv/ConvTranspose/Gemm/MatMul with a weight input (constant or computed), in graph order."""
    layers = []
    for position, node in enumerate(graph.nodes):
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        if not node.name:  # the name squeeze.pack gives an unnamed layer, so reports line up across passes
            node.name = fresh_node_name(graph, f"{node.op}_{position}")
        index = 1
        if node.op == "MatMul" and not isinstance(node.inputs[1], gs.Constant) \
                and isinstance(node.inputs[0], gs.Constant):
            index = 0
        if node.op == "Gemm" and node.attrs.get("transA", 0) and isinstance(node.inputs[0], gs.Constant):
            continue  # a constant A with a computed B: not a weight layer in the usual sense
        if isinstance(node.inputs[index], gs.Variable) and not node.inputs[index].inputs:
            continue  # the weight is a graph input: nothing to compress
        layers.append(Layer(node, index))
    return layers


def fresh_node_name(graph: gs.Graph, name: str) -> str:
    used = {n.name for n in graph.nodes}
    candidate, i = name, 1
    while candidate in used:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def select_layers(layers: list[Layer], skip: Iterable[str]) -> tuple[list[Layer], dict[str, str]]:
    """Split `layers` into (kept, {skipped name: why}); `skip` holds names, op types, patterns, first/last.

    Raises PassError naming the layers when an entry matches nothing, so a typo does not go unnoticed.
    """
    skip = list(skip or [])
    skipped: dict[str, str] = {}
    for entry in skip:
        hits = []
        if entry == "first" and layers:
            hits = [layers[0]]
        elif entry == "last" and layers:
            hits = [layers[-1]]
        else:
            hits = [l for l in layers if l.name == entry or l.op == entry or fnmatch.fnmatchcase(l.name, entry)]
        if not hits:
            names = ", ".join(l.name for l in layers[:20]) + (" ..." if len(layers) > 20 else "")
            raise PassError(f"skip entry {entry!r} matches no layer; layers are: {names} (or give an op type, "
                            "a pattern like 'conv*', 'first' or 'last')")
        for l in hits:
            skipped.setdefault(l.name, f"skip={entry}")
    return [l for l in layers if l.name not in skipped], skipped


# ---------------------------------------------------------------------------------------------- calibration

def layer_rows(layer: Layer, x: np.ndarray, rows: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Up to `rows` sampled input rows of `layer` from its input activation `x`: ([groups, P, D] float32, the
    sample (index into x's batch) each row comes from)."""
    if layer.op == "Conv":
        windows = conv_windows(layer.node, x, tuple(int(k) for k in layer.shape[2:]))
        spatial = windows.shape[2:4]
        total = len(x) * int(np.prod(spatial))
        pick = rng.choice(total, size=min(rows, total), replace=False) if total > rows else np.arange(total)
        patches, (ni, *_) = window_rows(windows, np.arange(len(x)), pick, spatial)
        return patches.reshape(len(pick), layer.groups, -1).transpose(1, 0, 2).astype(np.float32), ni
    if layer.op == "Gemm":
        a = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
        sample = np.arange(len(a))
        if layer.node.attrs.get("transA", 0):
            a, sample = a.T, np.zeros(a.shape[1], np.int64)
    else:
        a = x.reshape(-1, x.shape[-1])
        sample = np.arange(len(a)) // max(1, len(a) // max(1, x.shape[0]))
    if len(a) > rows:
        pick = rng.choice(len(a), size=rows, replace=False)
        a, sample = a[pick], sample[pick]
    return a[None].astype(np.float32), sample


def calibrate(model: onnx.ModelProto, data: Dataset, layers: list[Layer], *, rows: int = 4096,
              budget: int = 2_000_000, seed: int = 0, threads: int | None = None, chunk: int = 16,
              tensors: Iterable[str] = (), on_chunk: Callable[[dict[str, np.ndarray]], None] | None = None,
              with_samples: bool = False):
    """One run over `data`: sampled input rows [groups, P, D] per layer (name) with `has_matrix`, at most
    `rows` rows and `budget` floats per layer; `on_chunk` gets the activations of `tensors` chunk by chunk.
    With `with_samples`, also {layer: the calibration sample each row comes from}.

    A layer's rows are sampled at positions that depend only on the seed, the layer's name and the data, so a
    later call for the same layer on a changed model sees the same positions."""
    rngs = {l.name: np.random.default_rng([seed, zlib.crc32(l.name.encode())]) for l in layers}
    wanted = [l for l in layers if l.has_matrix]
    names = sorted({l.input.name for l in wanted} | set(tensors))
    inputs = {i.name for i in model.graph.input}
    computed = [n for n in names if n not in inputs]
    exposed = runtime.with_outputs(model, computed) if computed else model
    sess = runtime.session(exposed, threads, optimize=False) if computed else None
    stacked = all(data.stacked.get(n, True) for n in inputs if n in data.arrays)
    chunks = max(1, -(-len(data) // chunk))
    limit = {}
    for l in wanted:
        w = l.matrix(np.zeros(l.shape, np.float32))
        limit[l.name] = max(1, min(rows, budget // max(1, w.shape[0] * w.shape[2])))
    collected: dict[str, list[np.ndarray]] = {l.name: [] for l in wanted}
    origins: dict[str, list[np.ndarray]] = {l.name: [] for l in wanted}
    for start in range(0, len(data), chunk):
        part = data.subset(start, start + chunk)
        values = runtime.run(exposed, part, computed, sess=sess) if computed else {}
        for n in names:
            if n in inputs:
                values[n] = part.arrays[n]
        if not stacked:
            values = {k: v.reshape((-1,) + v.shape[2:]) if v.ndim >= 2 else v for k, v in values.items()}
        for l in wanted:
            share = -(-limit[l.name] // chunks)
            got, sample = layer_rows(l, values[l.input.name].astype(np.float32), share, rngs[l.name])
            collected[l.name].append(got)
            origins[l.name].append(start + sample)
        if on_chunk is not None:
            on_chunk({n: values[n] for n in tensors})
    rows_ = {k: np.concatenate(v, axis=1)[:, :limit[k]] for k, v in collected.items() if v}
    if not with_samples:
        return rows_
    return rows_, {k: np.concatenate(v)[:limit[k]] for k, v in origins.items() if v}


# ---------------------------------------------------------------------------------------------- rebuild ops

class Builder:
    """Adds nodes and constants with fresh names, and the standard-op subgraphs that rebuild weights from packed
    integers (small constants shared between layers)."""

    def __init__(self, graph: gs.Graph, name_nodes: bool = True):
        """`name_nodes=False` leaves the added nodes unnamed (ONNX node names are optional; a helper node's name
        would only repeat its output's, in bytes of the file)."""
        self.graph = graph
        self.name_nodes = name_nodes
        self.opset = int(graph.opset or 13)
        self._shared: dict[tuple, gs.Constant] = {}
        self._names = set(graph.tensors().keys())
        self._node_names = {n.name for n in graph.nodes}
        if self.opset < 7:
            raise PassError(f"the model has opset {self.opset}; the weight rebuild needs opset ≥ 7 "
                            "(numpy-style broadcasting). Upgrade it first, e.g. with onnx.version_converter")

    def fresh(self, name: str, taken: set[str] | None = None) -> str:
        taken = self._names if taken is None else taken
        candidate, i = name, 1
        while candidate in taken:
            candidate, i = f"{name}_{i}", i + 1
        taken.add(candidate)
        return candidate

    def const(self, name: str, values: np.ndarray) -> gs.Constant:
        """A fresh constant; a 0-d array stays a scalar (np.ascontiguousarray alone would make it [1], and ONNX
        Runtime fuses QDQ around Add/Mul only with scalar scales and zero points)."""
        values = np.asarray(values)
        return gs.Constant(self.fresh(name), np.ascontiguousarray(values).reshape(values.shape))

    def shared(self, key: tuple, name: str, values: np.ndarray) -> gs.Constant:
        """A small constant shared by every rebuild: this builder's, or one an earlier pass left in the graph under
        the same name and with the same values (so cutting a compressed weight adds no copies of them)."""
        if key not in self._shared:
            values = np.ascontiguousarray(values)
            existing = self.graph.tensors().get(name) if name in self._names else None
            if isinstance(existing, gs.Constant) and existing.dtype == values.dtype \
                    and tuple(existing.shape) == values.shape and np.array_equal(existing.values, values):
                self._shared[key] = existing
            else:
                self._shared[key] = self.const(name, values)
        return self._shared[key]

    def op(self, op: str, inputs: list[gs.Tensor], name: str, dtype, shape, **attrs) -> gs.Variable:
        """Append a node; its output gets `dtype`/`shape` (None for both leaves it untyped, which keeps small
        intermediate tensors out of the exported value_info)."""
        out = gs.Variable(self.fresh(name), dtype=dtype, shape=None if shape is None else list(shape))
        node = gs.Node(op, name=self.fresh(name, self._node_names) if self.name_nodes else "", attrs=attrs,
                       inputs=inputs, outputs=[out])
        self.graph.nodes.append(node)
        return out

    def indices(self, symbols: np.ndarray, bits: int, name: str) -> tuple[gs.Variable, gs.Constant]:
        """int64 [count] tensor of `symbols` (< 2**bits), stored bit-packed; also the stored constant."""
        count = int(symbols.size)
        if bits == 8:
            stored = self.const(f"{name}_u8", symbols.astype(np.uint8).ravel())
            return self.op("Cast", [stored], f"{name}_i64", None, None, to=onnx.TensorProto.INT64), stored
        packed = pack_bits(symbols, bits)
        groups = packed.shape[0]
        stored = self.const(f"{name}_packed{bits}", packed)
        # Symbol k of a group starts at bit b·k: in byte ⌊b·k/8⌋ at offset b·k mod 8, and spans at most two
        # bytes. Gather those two bytes per symbol, join them (lo + 256·hi), shift and mask: small exact integers.
        start = bits * np.arange(8)
        lo_index = self.shared(("lo", bits), f"pack{bits}_lo_byte", (start // 8).astype(np.int64))
        hi_index = self.shared(("hi", bits), f"pack{bits}_hi_byte",
                               np.minimum(start // 8 + 1, bits - 1).astype(np.int64))
        shift = self.shared(("shift", bits), f"pack{bits}_shift", (2 ** (start % 8)).astype(np.int64))
        base = self.shared(("base", bits), f"pack{bits}_base", np.array(1 << bits, np.int64))
        byte = self.shared(("byte",), "pack_byte", np.array(256, np.int64))
        wide = self.op("Cast", [stored], f"{name}_wide", None, None, to=onnx.TensorProto.INT64)
        lo = self.op("Gather", [wide, lo_index], f"{name}_lo", None, None, axis=1)
        hi = self.op("Gather", [wide, hi_index], f"{name}_hi", None, None, axis=1)
        pair = self.op("Add", [lo, self.op("Mul", [hi, byte], f"{name}_hi256", None, None)],
                       f"{name}_pair", None, None)
        high = self.op("Div", [pair, shift], f"{name}_shifted", None, None)
        top = self.op("Mul", [self.op("Div", [high, base], f"{name}_q", None, None), base],
                      f"{name}_top", None, None)
        symbols_2d = self.op("Sub", [high, top], f"{name}_sym", None, None)
        flat = self.op("Reshape", [symbols_2d, self.shared(("shape", -1), "flat_shape", np.array([-1], np.int64))],
                       f"{name}_flat", None, None)
        if groups * 8 != count:
            flat = self._slice(flat, count, groups * 8, f"{name}_idx")
        return flat, stored

    def integers(self, q: np.ndarray, bits: int, name: str, onnx_int4: bool = False) -> tuple[gs.Tensor, str]:
        """Signed integers `q` (|q| < 2^(bits−1)) as an int8-typed tensor of q's shape, and how it is stored: an
        int8 constant (8 bits), an ONNX INT4 constant, or bit-packed offset codes rebuilt to int8 by standard
        ops."""
        q = np.asarray(q)
        if bits == 8:
            return self.const(f"{name}_int8", q.astype(np.int8)), "int8"
        if onnx_int4:
            nibbles = (q.astype(np.int8).ravel() & 15).astype(np.uint8)
            nibbles = np.concatenate([nibbles, np.zeros(nibbles.size % 2, np.uint8)])
            raw = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()  # ONNX order: first element in the low nibble
            proto = onnx.helper.make_tensor(self.fresh(f"{name}_int4"), onnx.TensorProto.INT4, list(q.shape), raw,
                                            raw=True)
            return gs.Constant(proto.name, LazyValues(proto)), "onnx INT4"
        symbols = q.astype(np.int64).ravel() + (1 << (bits - 1))
        index, _ = self.indices(symbols, bits, f"{name}_q{bits}")
        offset = self.shared(("offset", bits), f"q{bits}_offset", np.array(1 << (bits - 1), np.int64))
        centred = self.op("Sub", [index, offset], f"{name}_q{bits}_signed", None, None)
        narrow = self.op("Cast", [centred], f"{name}_q{bits}_int8", None, None, to=onnx.TensorProto.INT8)
        return self.reshape(narrow, list(q.shape), f"{name}_q{bits}_shaped", np.int8), f"{bits}-bit packed"

    def _slice(self, x: gs.Variable, count: int, total: int, name: str) -> gs.Variable:
        """The first `count` of the `total` elements of the 1-D `x`."""
        if self.opset >= 10:
            starts = self.shared(("zero",), "slice_start_0", np.array([0], np.int64))
            ends = self.const(f"{name}_end", np.array([count], np.int64))
            return self.op("Slice", [x, starts, ends], name, None, None)
        # Before opset 10 Slice takes attributes, a form TVM's ONNX importer rejects ("Cannot cast NoneType to
        # list of Expr"); Split with its `split` attribute (opset 2-12) says the same and is imported, but TVM does
        # not fold it (the rebuild then runs on every inference): `codebook` upgrades such models to opset 10 first
        # and only falls back to this when it cannot.
        head = gs.Variable(self.fresh(name))
        rest = gs.Variable(self.fresh(f"{name}_padding"))
        self.graph.nodes.append(gs.Node("Split", name=self.fresh(name, self._node_names), attrs={
            "axis": 0, "split": [count, total - count]}, inputs=[x], outputs=[head, rest]))
        return head

    def reshape(self, x: gs.Variable, shape, name: str, dtype=np.float32) -> gs.Variable:
        target = self.const(f"{name}_shape", np.array(shape, np.int64))
        return self.op("Reshape", [x, target], name, dtype, shape)

    def channel_scale(self, x: gs.Variable, scale: np.ndarray, name: str, dtype=np.float32) -> gs.Variable:
        """`x` (a rebuilt weight of `x.shape`) times per-channel `scale` (shaped to broadcast along one axis),
        stored in scale's type and Cast to `dtype` when that differs (runtimes fold the Cast and the Mul)."""
        scale = np.asarray(scale)
        stored = self.const(f"{name}_channel_scale", scale)
        if scale.dtype != np.dtype(dtype):
            stored = self.op("Cast", [stored], f"{name}_channel_scale_cast", None, None,
                             to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        return self.op("Mul", [x, stored], f"{name}_scaled", dtype, x.shape)


# ---------------------------------------------------------------------------------------------- opset

def upgrade_opset(graph: gs.Graph, model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Convert `model` (the graph's source) to `version` and make `graph` that converted graph; returns it."""
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises several types; the message says which adapter failed
        raise PassError(f"cannot upgrade the model to opset {version} with onnx.version_converter: "
                        f"{str(exc).strip().splitlines()[0][:200]}") from exc
    new = gs.import_onnx(converted)
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
    graph.opset, graph.import_domains = new.opset, new.import_domains
    return converted


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether any node carries a graph attribute (If, Loop, Scan bodies)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


# ---------------------------------------------------------------------------------------------- compressed weights
# Other passes (prune, slim) meet weights that `codebook` or `quant` already compressed. These two functions let
# them read such a weight and cut channels from it while it stays compressed, so the passes compose in any order.

def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _stored_symbols(index: gs.Tensor) -> tuple[np.ndarray, int] | None:
    """(every stored symbol, bits) behind an int64 index tensor made by `Builder.indices`."""
    current = index
    for _ in range(16):  # the rebuild chain is short; its first input leads to the stored constant
        if isinstance(current, gs.Constant):
            values = current.values
            if values.dtype != np.uint8:
                return None
            if values.ndim == 2:
                return unpack_bits(values, values.shape[1]), int(values.shape[1])
            return values.astype(np.int64).ravel(), 8
        if not isinstance(current, gs.Variable) or len(current.inputs) != 1 or not current.inputs[0].inputs:
            return None
        current = current.inputs[0].inputs[0]
    return None


@dataclass
class _Codebook:
    table: gs.Tensor          # the codebook tensor, shared by the rebuilt weight
    values: np.ndarray        # its values, [K] or [K, k²]
    labels: np.ndarray        # an index per weight (shape of the weight) or per kernel ([O, I])
    bits: int
    shape: list[int]
    scale: np.ndarray | None = None   # per-channel scales the rebuilt weight is multiplied by (codebook scale=channel)

    def value(self) -> np.ndarray:
        shared = self.values[self.labels].reshape(self.shape)
        if self.scale is None:
            return shared
        return (shared * self.scale.astype(shared.dtype)).astype(shared.dtype)


@dataclass
class _Dequantized:
    params: list[gs.Tensor]   # scale and (optional) zero point, as DequantizeLinear takes them
    attrs: dict               # DequantizeLinear's attributes (axis, block_size)
    dtype: np.dtype           # the rebuilt value's type
    q: np.ndarray             # the integers, shape of the weight
    bits: int
    onnx_int4: bool
    cast: gs.Node | None      # a Cast after the DequantizeLinear (fp16 models)
    foldable: bool = False    # spelled Cast(integers) · scale (`foldable_dequantize`), not DequantizeLinear

    def rebuild(self, builder: "Builder", stored: gs.Tensor, params: list[gs.Tensor], name: str,
                shape: list[int]) -> gs.Variable:
        """The same form again over new integers `stored` and `params`."""
        if self.foldable:
            scale = folded(params[0])
            axis = int(self.attrs.get("axis", 1)) % len(shape) if scale.size > 1 else None
            out = foldable_dequantize(builder, stored, scale, axis, shape, name)
        else:
            out = builder.op("DequantizeLinear", [stored] + params, name, self.dtype, list(shape), **self.attrs)
        if self.cast is not None:
            out = builder.op("Cast", [out], f"{name}_cast", self.cast.outputs[0].dtype, list(shape),
                             **dict(self.cast.attrs))
        return out


def foldable_dequantize(builder: "Builder", stored: gs.Tensor, scale: np.ndarray, axis: int | None,
                        shape: list[int], name: str) -> gs.Variable:
    """Cast(stored integers → float32) · scale (per tensor, or per channel along `axis`): bit for bit what
    DequantizeLinear(stored, scale, axis) gives with zero point 0, spelled in ops that runtimes fold when they load
    the model. ONNX Runtime never folds a DequantizeLinear (it keeps each one for its QDQ fusion), so a layer that
    runs in float and reads its weight through one recomputes the weight on every run and cannot prepack it: a
    3×3 depthwise Conv on a 400×304 map ran 8.7 ms instead of 1 ms."""
    cast = builder.op("Cast", [stored], f"{name}_float", np.float32, list(shape), to=onnx.TensorProto.FLOAT)
    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return builder.op("Mul", [cast, builder.const(f"{name}_scale", scale.reshape(()))], name, np.float32,
                          list(shape))
    return builder.channel_scale(cast, _compact(_along(scale.ravel(), axis, len(shape))), name, np.float32)


def _as_codebook(tensor: gs.Tensor) -> _Codebook | None:
    mul = _producer(tensor, "Mul")
    if mul is not None and len(mul.inputs) == 2:  # channel scales: Mul(rebuilt codebook weight, scales)
        book = _as_codebook(mul.inputs[0])
        scale = folded(mul.inputs[1])
        if book is None or book.scale is not None or scale is None or book.values.ndim != 1 \
                or _scale_axis(scale, book.shape) is None:
            return None
        book.scale = scale
        return book
    reshape = _producer(tensor, "Reshape")
    gather = _producer(reshape.inputs[0], "Gather") if reshape is not None else None
    if gather is None or not isinstance(reshape.inputs[1], gs.Constant) or int(gather.attrs.get("axis", 0)) != 0:
        return None
    shape = [int(d) for d in reshape.inputs[1].values]
    table = gather.inputs[0]
    if isinstance(table, gs.Constant):
        values = table.values
    else:  # a quantized codebook: Reshape(Mul(Sub(Cast(codes), zero point), step))
        mul = _producer(_producer(table, "Reshape").inputs[0], "Mul") if _producer(table, "Reshape") else None
        sub = _producer(mul.inputs[0], "Sub") if mul is not None else None
        cast = _producer(sub.inputs[0], "Cast") if sub is not None else None
        codes = _stored_symbols(cast.inputs[0]) if cast is not None else None
        if codes is None or not all(isinstance(t, gs.Constant) for t in (mul.inputs[1], sub.inputs[1])):
            return None
        table_shape = [int(d) for d in _producer(table, "Reshape").inputs[1].values]
        dtype = sub.inputs[1].values.dtype
        count = int(np.prod(table_shape))
        values = ((codes[0][:count].astype(dtype) - sub.inputs[1].values) * mul.inputs[1].values).reshape(table_shape)
    symbols = _stored_symbols(gather.inputs[1])
    if symbols is None:
        return None
    per = values.shape[1] if values.ndim == 2 else 1
    label_shape = shape[:2] if per > 1 else shape
    count = int(np.prod(label_shape))
    if symbols[0].size < count or int(np.prod(shape)) != count * per:
        return None
    return _Codebook(table, values, symbols[0][:count].reshape(label_shape), symbols[1], shape)


def folded(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant, or of a Cast or Mul of constants (the compact forms `quant` stores scales and
    biases in, which runtimes fold at load); None for anything computed from the inputs."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "Cast" and len(node.inputs) == 1:
        value = folded(node.inputs[0])
        return None if value is None else value.astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if node.op == "Mul" and len(node.inputs) == 2:
        a, b = folded(node.inputs[0]), folded(node.inputs[1])
        return None if a is None or b is None else np.multiply(a, b).astype(np.result_type(a, b))
    return None


def _as_dequantized(tensor: gs.Tensor) -> _Dequantized | None:
    cast = _producer(tensor, "Cast")
    node = _producer(cast.inputs[0] if cast is not None else tensor, "DequantizeLinear")
    if node is None:
        return _as_foldable(tensor)
    if folded(node.inputs[1]) is None:
        return None
    stored = _stored_integers(node.inputs[0])
    if stored is None:
        return None
    params = [t for t in node.inputs[1:] if t.name]
    return _Dequantized(params, dict(node.attrs), node.outputs[0].dtype, *stored, cast)


def _as_foldable(tensor: gs.Tensor) -> _Dequantized | None:
    """`foldable_dequantize`'s Cast(int8 integers) · scale, scale per tensor or along one axis."""
    mul = _producer(tensor, "Mul")
    if mul is None or len(mul.inputs) != 2:
        return None
    cast = _producer(mul.inputs[0], "Cast")
    scale = folded(mul.inputs[1])
    stored = _stored_integers(cast.inputs[0]) if cast is not None else None
    if stored is None or stored[0].dtype != np.int8 or scale is None or scale.dtype != np.float32 \
            or int(cast.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
        return None
    q = stored[0]
    if scale.size == 1:
        return _Dequantized([gs.Constant(f"{tensor.name}_scale", scale.reshape(()))], {}, np.float32, *stored, None,
                            foldable=True)
    axis = _scale_axis(scale, q.shape)
    if axis is None:
        return None
    return _Dequantized([gs.Constant(f"{tensor.name}_scale", scale.ravel().copy())], {"axis": axis}, np.float32,
                        *stored, None, foldable=True)


def _scale_axis(scale: np.ndarray, shape) -> int | None:
    """The axis along which `scale` (of the weight's rank, broadcasting over `shape`) varies, 0 when it varies along
    none, None when it has another rank, varies along several axes or does not broadcast."""
    if scale.ndim != len(shape) or sum(d > 1 for d in scale.shape) > 1 \
            or any(d not in (1, n) for d, n in zip(scale.shape, shape)):
        return None
    return next((k for k, d in enumerate(scale.shape) if d > 1), 0)


def _stored_integers(stored: gs.Tensor) -> tuple[np.ndarray, int, bool] | None:
    """(integers, bits, whether ONNX INT4) of the integers a dequantization reads: a constant, int32 biases stored as
    int16 + Cast, or `Builder.integers`' bit-packed Reshape(Cast(Sub(index, offset)))."""
    if not isinstance(stored, gs.Constant) and folded(stored) is not None:  # int32 biases stored as int16 + Cast
        return folded(stored), 8 * folded(stored).dtype.itemsize, False
    if isinstance(stored, gs.Constant):
        int4 = isinstance(stored._values, LazyValues) and stored._values.tensor.data_type == onnx.TensorProto.INT4
        q = onnx.numpy_helper.to_array(stored._values.tensor).astype(np.int8) if int4 else stored.values
        return q, 4 if int4 else 8 * q.dtype.itemsize, int4
    reshape = _producer(stored, "Reshape")  # bit-packed: Reshape(Cast(Sub(index, offset)))
    narrow = _producer(reshape.inputs[0], "Cast") if reshape is not None else None
    sub = _producer(narrow.inputs[0], "Sub") if narrow is not None else None
    symbols = _stored_symbols(sub.inputs[0]) if sub is not None else None
    if symbols is None or not isinstance(sub.inputs[1], gs.Constant) or not isinstance(reshape.inputs[1], gs.Constant):
        return None
    shape = [int(d) for d in reshape.inputs[1].values]
    offset = int(np.asarray(sub.inputs[1].values).ravel()[0])
    q = (symbols[0][:int(np.prod(shape))] - offset).reshape(shape).astype(np.int8)
    return q, symbols[1], False


def compressed_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The float values of a weight that `codebook` or `quant` rebuilds in the graph; None for anything else."""
    book = _as_codebook(tensor)
    if book is not None:
        return book.value()
    deq = _as_dequantized(tensor)
    if deq is None:
        return None
    scale = folded(deq.params[0]).astype(np.float32)
    zero = folded(deq.params[1]) if len(deq.params) > 1 else np.zeros_like(scale, np.int64)
    block = int(deq.attrs.get("block_size", 0) or 0)
    if block and scale.size > 1:  # blocked quantization: one scale per `block` elements along `axis`
        axis = int(deq.attrs.get("axis", 1)) % deq.q.ndim
        count = deq.q.shape[axis]
        scale = np.repeat(scale, block, axis=axis).take(np.arange(count), axis=axis)
        zero = np.repeat(np.asarray(zero), block, axis=axis).take(np.arange(count), axis=axis)
    elif scale.size > 1:
        axis = int(deq.attrs.get("axis", 1)) % deq.q.ndim
        shape = [1] * deq.q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), np.asarray(zero).reshape(shape)
    values = ((deq.q.astype(np.int64) - np.asarray(zero, np.int64)).astype(np.float32) * scale).astype(np.float32)
    if deq.cast is not None:
        values = values.astype(onnx.helper.tensor_dtype_to_np_dtype(deq.cast.attrs["to"]))
    return values


def _base_name(name: str) -> str:
    """`name` without the suffixes that cutting and refitting add (`_cut`, `_refit`, `_rescaled`, and the counter
    `Builder.fresh` appends), so names do not grow with every pass that rewrites a compressed weight."""
    while True:
        match = re.fullmatch(r"(.+?)(?:_cut|_refit|_rescaled)(?:_\d+)?", name)
        if match is None:
            return name
        name = match.group(1)


def compressed_kind(tensor: gs.Tensor) -> str | None:
    """`codebook` or `quant` when the tensor is a weight that pass rebuilds in the graph, else None."""
    if _as_codebook(tensor) is not None:
        return "codebook"
    return "quant" if _as_dequantized(tensor) is not None else None


def compressed_cut_problem(tensor: gs.Tensor, axis: int) -> str | None:
    """Why `take_compressed` cannot cut this compressed weight along `axis` (None when it can, or when the tensor
    is not a compressed weight), for the note a pass gives when it leaves the channels alone."""
    book = _as_codebook(tensor)
    if book is not None:
        if axis >= book.labels.ndim:
            return f"its codebook entries are whole kernels, which axis {axis} would split"
        return None
    deq = _as_dequantized(tensor)
    if deq is None:
        return None
    if int(deq.attrs.get("block_size", 0) or 0):
        return "it is block-quantized (DequantizeLinear block_size), whose scales cannot be cut per channel"
    if not 0 <= axis < deq.q.ndim:
        return f"its integers have no axis {axis}"
    params = deq.params
    if any(folded(t) is None for t in params):
        return "its DequantizeLinear scale or zero point is computed"
    scale = folded(params[0])
    axis_size = deq.q.shape[int(deq.attrs.get("axis", 1)) % deq.q.ndim]
    if scale.size > 1 and (scale.ndim != 1 or scale.size != axis_size):
        return "its DequantizeLinear scales are not one per channel of one axis"
    return None


def take_compressed(graph: gs.Graph, node: gs.Node, index: int, keep: np.ndarray, axis: int) -> bool:
    """Keep only `keep` along `axis` of `node.inputs[index]` when it is a weight that `codebook` or `quant`
    rebuilds, staying compressed (indices or integers are cut, the codebook is kept); False otherwise."""
    tensor = node.inputs[index]
    base = _base_name(tensor.name)
    keep = np.asarray(keep, np.int64)
    builder = Builder(graph)
    book = _as_codebook(tensor)
    if book is not None:
        if axis >= book.labels.ndim:
            return False  # a spatial axis of kernels shared whole
        labels = np.take(book.labels, keep, axis=axis)
        shape = list(book.shape)
        shape[axis] = len(keep)
        index_t, _ = builder.indices(labels.ravel(), book.bits, f"{base}_cut_index")
        gathered = builder.op("Gather", [book.table, index_t], f"{base}_cut_gathered", None, None, axis=0)
        out = builder.reshape(gathered, shape, f"{base}_cut", book.values.dtype)
        if book.scale is not None:
            scale = np.take(book.scale, keep, axis=axis) if book.scale.shape[axis] > 1 else book.scale
            out = builder.channel_scale(out, _compact(scale), f"{base}_cut", book.values.dtype)
        node.inputs[index] = out
        return True
    deq = _as_dequantized(tensor)
    if deq is None:
        return False
    q = np.take(deq.q, keep, axis=axis)
    if deq.q.dtype == np.int8:  # int8 constant, ONNX INT4, or bit-packed: stored the same way again
        stored, _ = builder.integers(q, deq.bits, f"{base}_cut", deq.onnx_int4)
    else:                       # int32 biases, uint8 weights of other quantizers: a plain constant
        stored = builder.const(f"{base}_cut_q", q)
    params = deq.params
    if folded(params[0]).size > 1 and int(deq.attrs.get("axis", 1)) % deq.q.ndim == axis:
        params = [builder.const(f"{_base_name(t.name)}_cut", np.take(folded(t), keep)) for t in params]
    node.inputs[index] = deq.rebuild(builder, stored, params, f"{base}_cut", list(q.shape))
    return True


def replace_compressed(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> bool:
    """Make `node.inputs[index]` hold `values`, stored the way that input is stored now when it is a weight that
    `codebook` or `quant` rebuilds (so a refit, e.g. pruning's compensation, keeps the layer compressed); False
    (nothing changed) for any other input, or when `values` do not fit the stored form.

    Codebook: every weight (or kernel, for a kernel codebook) is snapped to its nearest codebook entry. Quant:
    symmetric integer weights get scales recomputed from the new values as `quant` computes them (max |w| per
    channel over qmax), and an int32 bias with scale = input scale × weight scale is rescaled with them, so an
    integer kernel still adds it correctly; other integers (int32 biases, asymmetric weights) keep their scale
    and zero point and are rounded and clipped to their type.
    """
    tensor = node.inputs[index]
    base = _base_name(tensor.name)
    values = np.asarray(values)
    book = _as_codebook(tensor)
    if book is not None:
        table = book.values.astype(np.float64)
        per = table.shape[1] if table.ndim == 2 else 1
        if per > 1 and (values.ndim < 2 or int(np.prod(values.shape[2:])) != per):
            return False
        target = values.astype(np.float64)
        if book.scale is not None:
            if book.scale.ndim != values.ndim or any(d not in (1, n) for d, n in zip(book.scale.shape, values.shape)):
                return False
            scale = book.scale.astype(np.float64)
            target = target / np.where(scale != 0, scale, 1.0)
        labels = _nearest_entries(table.reshape(len(table), per), target.reshape(-1, per))
        builder = Builder(graph)
        index_t, _ = builder.indices(labels, book.bits, f"{base}_refit_index")
        gathered = builder.op("Gather", [book.table, index_t], f"{base}_refit_gathered", None, None, axis=0)
        out = builder.reshape(gathered, list(values.shape), f"{base}_refit", book.values.dtype)
        if book.scale is not None:
            out = builder.channel_scale(out, _compact(book.scale), f"{base}_refit", book.values.dtype)
        node.inputs[index] = out
        return True
    deq = _as_dequantized(tensor)
    if deq is None or values.ndim != deq.q.ndim:
        return False
    params = deq.params
    if any(folded(t) is None for t in params) or int(deq.attrs.get("block_size", 0) or 0):
        return False
    scale, zero = folded(params[0]), (folded(params[1]) if len(params) > 1 else None)
    axis = int(deq.attrs.get("axis", 1)) % values.ndim if scale.size > 1 else None
    if axis is not None and (scale.ndim != 1 or scale.size != values.shape[axis]):
        return False
    v = values.astype(np.float64)
    builder = Builder(graph)
    name = f"{base}_refit"
    symmetric = deq.q.dtype == np.int8 and (zero is None or not np.any(zero))
    if symmetric:
        qmax = (1 << (deq.bits - 1)) - 1
        peak = np.abs(v).max(initial=0.0) if axis is None else \
            np.abs(np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)).max(axis=1, initial=0.0)
        new_scale = np.where(peak > 0, peak / qmax, 1.0).astype(scale.dtype).reshape(scale.shape)
        q = np.clip(np.round(v / _along(new_scale.astype(np.float64), axis, v.ndim)), -qmax, qmax).astype(np.int8)
        stored, _ = builder.integers(q, deq.bits, name, deq.onnx_int4)
        if index == 1:
            _rescale_int32_bias(graph, node, scale, new_scale)
        params = [builder.const(f"{name}_scale", new_scale)] + params[1:]
    else:
        info = np.iinfo(deq.q.dtype)
        s = _along(scale.astype(np.float64), axis, v.ndim)
        z = _along(np.asarray(zero if zero is not None else 0, np.float64), axis, v.ndim)
        q = np.clip(np.round(v / np.where(s > 0, s, 1.0) + z), info.min, info.max).astype(deq.q.dtype)
        if deq.q.dtype == np.int8 and deq.bits < 8:
            return False  # bit-packed integers with a zero point: not a form `quant` writes
        stored = builder.const(f"{name}_q", q) if deq.q.dtype != np.int8 else builder.integers(q, 8, name)[0]
    node.inputs[index] = deq.rebuild(builder, stored, params, name, list(q.shape))
    return True


def _compact(scale: np.ndarray) -> np.ndarray:
    """Channel scales as float16 when that holds them exactly (as `codebook` stores them), else as they are."""
    half = scale.astype(np.float16)
    return half if np.array_equal(half.astype(scale.dtype), scale) else scale


def _along(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """Per-channel `values` shaped to broadcast along `axis` of an ndim tensor (a scalar when axis is None)."""
    if axis is None:
        return np.asarray(values).reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(values).reshape(shape)


def _nearest_entries(table: np.ndarray, vectors: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Index of the nearest row of `table` [K, d] for every row of `vectors` [N, d] (squared distance)."""
    if table.shape[1] == 1:  # scalar codebook: a sorted search, no N×K matrix
        order = np.argsort(table[:, 0], kind="stable")
        sorted_ = table[order, 0]
        x = vectors[:, 0]
        hi = np.clip(np.searchsorted(sorted_, x), 1, len(sorted_) - 1) if len(sorted_) > 1 else np.zeros(len(x), int)
        lo = np.maximum(hi - 1, 0)
        pick = np.where(np.abs(x - sorted_[lo]) <= np.abs(sorted_[hi] - x), lo, hi)
        return order[pick].astype(np.int64)
    norms = (table ** 2).sum(axis=1)
    out = np.empty(len(vectors), np.int64)
    for start in range(0, len(vectors), chunk):
        part = vectors[start:start + chunk]
        out[start:start + chunk] = np.argmin(norms[None, :] - 2.0 * part @ table.T, axis=1)
    return out


def _rescale_int32_bias(graph: gs.Graph, node: gs.Node, old_scale: np.ndarray, new_scale: np.ndarray) -> None:
    """After the weight scales of `node` changed: an int32 bias whose scale is input scale × weight scale (as
    `quant` stores it) gets the scale input scale × new weight scale, and its integers re-rounded to it."""
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    deq = _as_dequantized(bias) if bias is not None else None
    if deq is None or deq.q.dtype != np.int32 or deq.cast is not None:
        return
    params = deq.params
    if deq.foldable or any(folded(t) is None for t in params) or (len(params) > 1 and np.any(folded(params[1]))):
        return
    b_scale = folded(params[0]).astype(np.float64)
    w_old, w_new = old_scale.astype(np.float64).ravel(), new_scale.astype(np.float64).ravel()
    if b_scale.size not in (1, w_old.size) or (b_scale.size == 1 and w_old.size > 1) or not np.all(w_old > 0):
        return
    input_scale = b_scale.ravel() / w_old
    if not np.allclose(input_scale, input_scale[0], rtol=1e-4):
        return  # not input scale × weight scale: leave it as it is
    b_new = (input_scale[0] * w_new).astype(folded(params[0]).dtype).reshape(folded(params[0]).shape)
    values = deq.q.astype(np.float64) * _along(b_scale, 0 if b_scale.size > 1 else None, deq.q.ndim)
    s = _along(b_new.astype(np.float64), 0 if b_new.size > 1 else None, deq.q.ndim)
    q = np.clip(np.round(values / np.where(s > 0, s, 1.0)), -2**31, 2**31 - 1).astype(np.int32)
    builder = Builder(graph)
    name = f"{_base_name(bias.name)}_rescaled"
    node.inputs[2] = builder.op("DequantizeLinear", [builder.const(f"{name}_int32", q),
                                                     builder.const(f"{name}_scale", b_new)] + params[1:],
                                name, deq.dtype, list(q.shape), **deq.attrs)
