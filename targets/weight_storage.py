"""Compact weights for firmware: int8 / bit-packed integers or packed codebook indices in flash, decoded at run time.

A `quant` model reads its weights through DequantizeLinear(int8 constant, scale), a `codebook` model through
Gather(codebook, unpacked indices); TVM folds both at compile time, so a firmware would hold float weights. Here,
on a copy of the model, every large float weight that a constant subgraph computes (or that an initializer holds)
is analysed by its values and, when a compact form rebuilds it bit for bit, becomes a graph input
(`squeeze_w<i>`): TVM then sees an input, folds nothing, and `c_program` binds that input to a scratch buffer
that squeeze's decoder fills from the compact data right before the layer that reads it.

Two forms, chosen by size (both exact, both checked against the float values before they are used):

- **affine**: the weight is the output of a DequantizeLinear of integers (per tensor or per channel): the integers
  are stored as int8 (8 bits) or bit-packed k-bit offsets, the scales and zero points as small tables;
  value = (q − zero[c]) · scale[c] in float32, exactly what DequantizeLinear computes.
- **codebook**: the weight has at most 256 distinct values (per weight) or distinct k×k kernels (per kernel):
  bit-packed indices plus the table of values (Han et al., "Deep Compression", 2016; Yu et al. 2020 per kernel).
  A weight computed as Mul(codebook weight, per-channel scales) (`codebook` with scale=channel) keeps the scales
  apart: value = table[symbol] · scale[c] in float32, the one multiply the graph's Mul does.

A Gemm that reads its weight transposed (transB=1) gets the weight stored transposed and transB=0, so TVM needs no
transpose at run time. The compute stays float32: the weight is decoded into RAM (the decode scratch), one layer at
a time, which costs RAM (the largest decoded weight) and decode instructions and saves flash.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from squeeze.pack import pack_bits

MIN_BYTES = 256       # smaller float weights (biases, scales) stay float: a decode call would cost more than it saves
MAX_RATIO = 0.75      # a compact form must be at most this share of the float bytes to be used
MAX_SYMBOLS = 256     # codebooks and integer ranges up to 8 bits
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
PREFIX = "squeeze_w"


@dataclass
class CompactWeight:
    """One weight as firmware stores it and how to rebuild its float32 values."""

    name: str                 # the graph input that replaces the weight in the rewritten model
    source: str               # the weight tensor's name in the model
    layers: list[str]         # names of the nodes that read it
    shape: tuple[int, ...]    # as the layers read it (transposed for a Gemm with transB=1)
    kind: str                 # "affine" or "codebook"
    bits: int                 # bits per stored symbol
    data: np.ndarray          # stored bytes: int8 values, or an LSB-first bit stream of symbols + 1 padding byte
    table: np.ndarray         # float32: scale per channel (affine) or codebook values [K * per] (codebook)
    zero: np.ndarray | None = None   # int32 zero point per channel (affine)
    signed: bool = False      # affine 8-bit: the bytes are int8
    inner: int = 1            # affine: elements per channel step (channel c = (i // inner) % channels)
    channels: int = 1
    per: int = 1              # codebook: values per symbol (1 per weight, k*k per kernel)
    transposed: bool = False
    scale: np.ndarray | None = None  # codebook: float32 scale per channel (channel c as for affine), else None

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def float_bytes(self) -> int:
        return 4 * self.count

    @property
    def stored_bytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def table_bytes(self) -> int:
        return int(self.table.nbytes) + (int(self.zero.nbytes) if self.zero is not None else 0) \
            + (int(self.scale.nbytes) if self.scale is not None else 0)

    @property
    def storage(self) -> str:
        """What the report says: `int8`, `packed 4-bit int`, `packed 4-bit + codebook[16]`, ..."""
        if self.kind == "affine":
            return "int8" if self.bits == 8 else f"packed {self.bits}-bit int"
        entries = self.table.size // self.per
        unit = f"codebook[{entries}×{self.per}]" if self.per > 1 else f"codebook[{entries}]"
        scales = f" × scale[{self.channels}]" if self.scale is not None else ""
        return f"packed {self.bits}-bit + {unit}{scales}"

    def symbols(self) -> np.ndarray:
        """The stored symbols as int64 (what the C decoder reads)."""
        n = self.count // self.per
        if self.signed:
            return self.data.view(np.int8)[:n].astype(np.int64)
        if self.bits == 8:
            return self.data[:n].astype(np.int64)
        stream = np.unpackbits(self.data, bitorder="little")[: n * self.bits]
        return (stream.reshape(n, self.bits).astype(np.int64) << np.arange(self.bits)).sum(axis=1)

    def decode(self) -> np.ndarray:
        """float32 values of the weight, computed the way the C decoder computes them."""
        s = self.symbols()
        if self.kind == "affine":
            c = (np.arange(self.count) // self.inner) % self.channels
            out = (s - self.zero[c]).astype(np.int32).astype(np.float32) * self.table[c]
        else:
            out = self.table.reshape(-1, self.per)[s].reshape(-1)
            if self.scale is not None:
                out = out * self.scale[(np.arange(self.count) // self.inner) % self.channels]
        return out.astype(np.float32).reshape(self.shape)


@dataclass
class Plan:
    """The rewritten model (compact weights as inputs) and what was decided for every large weight."""

    model: onnx.ModelProto
    weights: list[CompactWeight]
    kept: dict[str, str] = field(default_factory=dict)   # large float weights left as they were, with the reason

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {w.name: w.shape for w in self.weights}


# ---------------------------------------------------------------------------------------------- analysis

def plan(model: onnx.ModelProto, *, min_bytes: int = MIN_BYTES, max_ratio: float = MAX_RATIO,
         leave: dict[str, str] | None = None) -> Plan:
    """Find the large constant weights that a compact form rebuilds exactly; rewrite a copy to read them as inputs.

    A weight is a float32 constant tensor (an initializer, or the output of nodes that read only constants) that a
    non-constant node reads. Returns the model unchanged (and no weights) when none qualifies. `leave`: weights
    to leave as they are (name → why: the int8 kernels read their integers directly).
    """
    leave = leave or {}
    const_nodes, boundary = _constant_boundary(model)
    nodes = model.graph.node
    values = _evaluate(model, [nodes[k] for k in const_nodes])
    producers = {o: nodes[k] for k in const_nodes for o in nodes[k].output}
    readers = _readers(model, const_nodes, set(boundary))
    weights, kept = [], {}
    for name in boundary:
        value = values.get(name)
        if value is None or value.dtype != np.float32 or value.nbytes < min_bytes:
            continue
        if name in leave:
            kept[name] = leave[name]
            continue
        transposed = _read_transposed([nodes[k] for k in readers[name]], name)
        found = _compact(name, value, producers.get(name), values, model, transposed, producers)
        if found is None:
            kept[name] = "no exact compact form (more than 256 distinct values, not dequantized integers)"
            continue
        if found.stored_bytes + found.table_bytes > max_ratio * found.float_bytes:
            kept[name] = (f"compact form {found.storage} would be {found.stored_bytes + found.table_bytes} bytes of "
                          f"{found.float_bytes}")
            continue
        found.name = f"{PREFIX}{len(weights)}"
        found.layers = [nodes[k].name or f"{nodes[k].op_type}_{k}" for k in readers[name]]
        weights.append(found)
    if not weights:
        return Plan(model, [], kept)
    return Plan(_rewrite(model, weights, readers), weights, kept)


def dequantized(model: onnx.ModelProto, integers: list[np.ndarray]) -> dict[str, str]:
    """The outputs of the DequantizeLinear nodes whose integer input (an initializer) holds one of `integers` (as
    is or transposed: a Gemm's weight), each with the reason to leave it alone: the int8 kernels read it."""
    seen = {(a.dtype.str, a.shape, a.tobytes()) for w in integers for a in (w, np.ascontiguousarray(w.T))}
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = numpy_helper.to_array(inits[node.input[0]])
            if (q.dtype.str, q.shape, q.tobytes()) in seen:
                out[node.output[0]] = "computed in int8: the kernels read the int8 constant (in flash as it is)"
    return out


def _constant_boundary(model: onnx.ModelProto) -> tuple[list[int], list[str]]:
    """(indices of the nodes computed from constants only, constant tensors that a non-constant node reads), in
    graph order."""
    constant = {i.name for i in model.graph.initializer}
    const_nodes = []
    for k, node in enumerate(model.graph.node):
        if node.op_type in RANDOM_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                             for a in node.attribute):
            continue
        if all(not i or i in constant for i in node.input):
            const_nodes.append(k)
            constant.update(o for o in node.output if o)
    boundary: list[str] = []
    const_set = set(const_nodes)
    for k, node in enumerate(model.graph.node):
        if k in const_set:
            continue
        for i in node.input:
            if i in constant and i not in boundary:
                boundary.append(i)
    return const_nodes, boundary


def _readers(model: onnx.ModelProto, const_nodes: list[int], names: set[str]) -> dict[str, list[int]]:
    """Indices of the non-constant nodes reading each of `names`."""
    const_set = set(const_nodes)
    out: dict[str, list[int]] = {n: [] for n in names}
    for k, node in enumerate(model.graph.node):
        if k in const_set:
            continue
        for i in node.input:
            if i in out and k not in out[i]:
                out[i].append(k)
    return out


def _evaluate(model: onnx.ModelProto, const_nodes: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """Values of the initializers and of every constant node's outputs, computed by ONNX Runtime without graph
    optimizations (the semantics the numeric check compares with)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    wanted = [o for n in const_nodes for o in n.output if o]
    if not wanted:
        return values
    from squeeze import runtime  # noqa: PLC0415
    graph = onnx.helper.make_graph(list(const_nodes), "constants", [],
                                   [onnx.helper.make_empty_tensor_value_info(o) for o in wanted],
                                   list(model.graph.initializer))
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        sub = onnx.shape_inference.infer_shapes(sub)
        results = runtime.session(sub, threads=1, optimize=False).run(wanted, {})
    except Exception:  # an op ONNX Runtime cannot run alone, a type it cannot infer: TVM folds those weights
        return values
    values.update({o: np.asarray(v) for o, v in zip(wanted, results)})
    return values


def _read_transposed(readers: list[onnx.NodeProto], name: str) -> bool:
    """Every reader is a Gemm that takes the weight as B with transB=1: store it transposed."""
    if not readers:
        return False
    for node in readers:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or list(node.input).index(name) != 1 or node.input[0] == name \
                or not attrs.get("transB", 0):
            return False
    return True


def _compact(name: str, value: np.ndarray, producer: onnx.NodeProto | None, values: dict[str, np.ndarray],
             model: onnx.ModelProto, transposed: bool, producers: dict[str, onnx.NodeProto]) -> CompactWeight | None:
    """The smallest exact compact form of `value` (None if none rebuilds it bit for bit)."""
    if transposed:
        value = np.ascontiguousarray(value.T)
    candidates = []
    if producer is not None and producer.op_type == "DequantizeLinear":
        candidates.append(_affine(name, value, producer, values, model, transposed))
    if producer is not None and producer.op_type == "Mul":
        candidates.append(_scaled_integers(name, value, producer, values, producers, transposed))
        candidates += _scaled_codebooks(name, value, producer, values, transposed)
    candidates += _codebooks(name, value)
    exact = [c for c in candidates if c is not None and np.array_equal(c.decode().view(np.uint32),
                                                                       value.view(np.uint32))]
    if not exact:
        return None
    best = min(exact, key=lambda c: c.stored_bytes + c.table_bytes)
    best.transposed = transposed
    return best


def _affine(name: str, value: np.ndarray, node: onnx.NodeProto, values: dict[str, np.ndarray],
            model: onnx.ModelProto, transposed: bool) -> CompactWeight | None:
    """The DequantizeLinear's integers, stored as int8 or bit-packed offsets, with per-channel scale and zero."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("block_size", 0):
        return None
    q = values.get(node.input[0])
    scale = values.get(node.input[1])
    zp = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if q is None or scale is None or q.dtype.kind not in "iu" or scale.dtype != np.float32:
        return None
    zero = np.zeros(scale.shape, np.int64) if zp is None else zp.astype(np.int64).reshape(scale.shape)
    axis = int(attrs.get("axis", 1)) % max(q.ndim, 1) if scale.size > 1 else 0
    return _integers(name, value, q.astype(np.int64), scale, zero, axis, transposed)


def _scaled_integers(name: str, value: np.ndarray, node: onnx.NodeProto, values: dict[str, np.ndarray],
                     producers: dict[str, onnx.NodeProto], transposed: bool) -> CompactWeight | None:
    """Mul(Cast(integers → float32), scale per tensor or along one axis): `quant`'s form for the weight of a layer
    that runs in float (weights.foldable_dequantize), the affine form with zero point 0."""
    if len(node.input) != 2:
        return None
    cast = producers.get(node.input[0])
    q = values.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
    scale = values.get(node.input[1])
    if q is None or scale is None or q.dtype.kind not in "iu" or scale.dtype != np.float32 or scale.ndim > q.ndim:
        return None
    scale = scale.reshape((1,) * (q.ndim - scale.ndim) + scale.shape)
    axis = _scale_axis(scale, q.shape)
    if axis is None:
        return None
    scale = scale.ravel()
    return _integers(name, value, q.astype(np.int64), scale, np.zeros(scale.shape, np.int64), axis, transposed)


def _scale_axis(scale: np.ndarray, shape: tuple[int, ...]) -> int | None:
    """The axis along which `scale` (of the weight's rank, broadcasting over `shape`) varies, 0 when it varies along
    none, None when it varies along several or does not broadcast."""
    if sum(d > 1 for d in scale.shape) > 1 or any(d not in (1, n) for d, n in zip(scale.shape, shape)):
        return None
    return next((k for k, d in enumerate(scale.shape) if d > 1), 0)


def _integers(name: str, value: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int,
              transposed: bool) -> CompactWeight | None:
    """Integers `q` with per-channel (along `axis`) or per-tensor scale and zero point, stored as int8 or
    bit-packed offsets (`value`: the float weight, transposed when read so)."""
    if transposed:
        q, axis = q.T, (1 - axis if scale.size > 1 else 0)
    if q.shape != value.shape:
        return None
    channels = int(scale.size)
    inner = int(np.prod(q.shape[axis + 1:], dtype=np.int64)) if channels > 1 else q.size
    lo, hi = int(q.min()), int(q.max())
    if hi - lo >= MAX_SYMBOLS:
        return None
    if lo >= -128 and hi <= 127 and hi - lo >= 128:  # needs all 8 bits: keep the int8 values themselves
        data, bits, signed, offset = q.astype(np.int8).view(np.uint8).ravel(), 8, True, 0
    else:
        bits = max(1, math.ceil(math.log2(hi - lo + 1)))
        data, signed, offset = packed(q.ravel() - lo, bits), False, lo
    return CompactWeight(name, name, [], tuple(value.shape), "affine", bits, data,
                         scale.astype(np.float32).ravel(), (zero.ravel() - offset).astype(np.int32),
                         signed, inner, channels)


def _codebooks(name: str, value: np.ndarray) -> list[CompactWeight]:
    """Per-weight codebook (≤ 256 distinct values) and, for 4-D weights, per-kernel codebook (≤ 256 kernels)."""
    out = []
    words = value.view(np.uint32).ravel()
    forms = [1]
    if value.ndim == 4 and value.shape[2] * value.shape[3] > 1:
        forms.append(int(value.shape[2] * value.shape[3]))
    for per in forms:
        rows = words.reshape(-1, per)
        table, labels = np.unique(rows, axis=0, return_inverse=True)
        if len(table) > MAX_SYMBOLS:
            continue
        bits = max(1, math.ceil(math.log2(len(table))))
        data = packed(labels.ravel(), bits) if bits < 8 else labels.astype(np.uint8).ravel()
        out.append(CompactWeight(name, name, [], tuple(value.shape), "codebook", bits, data,
                                 table.reshape(-1).view(np.float32).copy(), per=per))
    return out


def _scaled_codebooks(name: str, value: np.ndarray, node: onnx.NodeProto, values: dict[str, np.ndarray],
                      transposed: bool) -> list[CompactWeight]:
    """Mul(weight of the weight's shape, scales that vary along at most one axis): the codebooks of that weight
    (`_codebooks`), each with the scales per channel of that axis. `value` is as stored (transposed when read so)."""
    if len(node.input) != 2:
        return []
    out = []
    for a, b in ((0, 1), (1, 0)):
        base, scale = values.get(node.input[a]), values.get(node.input[b])
        if base is None or scale is None or base.dtype != np.float32 or scale.dtype != np.float32 \
                or scale.ndim > base.ndim:
            continue
        scale = scale.reshape((1,) * (base.ndim - scale.ndim) + scale.shape)
        if transposed:
            base, scale = base.T, scale.T
        axis = _scale_axis(scale, base.shape)
        if base.shape != value.shape or axis is None:
            continue
        channels = int(scale.size)
        inner = int(np.prod(base.shape[axis + 1:], dtype=np.int64)) if channels > 1 else base.size
        for book in _codebooks(name, np.ascontiguousarray(base)):
            book.scale, book.inner, book.channels = scale.ravel().copy(), inner, channels
            out.append(book)
    return out


def packed(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Symbols < 2^bits as an LSB-first bit stream (squeeze.pack's layout), plus one zero byte so the decoder may
    always read two bytes."""
    if bits == 8:
        return np.asarray(symbols).astype(np.uint8).ravel()
    stream = pack_bits(np.asarray(symbols).ravel(), bits).ravel()
    used = -(-np.asarray(symbols).size * bits // 8)
    return np.concatenate([stream[:used], np.zeros(1, np.uint8)])


# ---------------------------------------------------------------------------------------------- rewrite

def _rewrite(model: onnx.ModelProto, weights: list[CompactWeight], readers: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy where each compact weight's readers read the graph input `w.name` (transB=0 where transposed) and
    the constants only they needed are gone."""
    import onnx_graphsurgeon as gs  # noqa: PLC0415
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for w in weights:
        for k in readers[w.source]:
            node = copy.graph.node[k]
            for slot, name in enumerate(node.input):
                if name == w.source:
                    node.input[slot] = w.name
            if w.transposed:
                for a in node.attribute:
                    if a.name == "transB":
                        a.i = 0
        copy.graph.input.append(onnx.helper.make_tensor_value_info(w.name, onnx.TensorProto.FLOAT, list(w.shape)))
    graph = gs.import_onnx(copy)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


# ---------------------------------------------------------------------------------------------- C decoder

DECODE_C = r"""
/* Compact weights (targets/weight_storage.py): decoded into the scratch buffer right before the layer runs. */
static uint32_t squeeze_symbol(const uint8_t* d, uint32_t j, uint32_t bits) {
  uint32_t bit = j * bits;
  uint32_t two = (uint32_t)d[bit >> 3] | ((uint32_t)d[(bit >> 3) + 1] << 8);
  return (two >> (bit & 7u)) & ((1u << bits) - 1u);
}
/* value = (q - zero[c]) * scale[c], c = (i / inner) % channels: what DequantizeLinear computes */
static void squeeze_decode_affine(const uint8_t* d, uint32_t bits, int is_signed, const float* scale,
                                  const int32_t* zero, uint32_t count, uint32_t inner, uint32_t channels,
                                  float* out) {
  uint32_t i = 0, c = 0;
  while (i < count) {
    const float s = scale[c];
    const int32_t z = zero[c];
    uint32_t end = i + inner;
    if (bits == 8u && is_signed) {
      for (; i < end; ++i) out[i] = (float)((int32_t)(int8_t)d[i] - z) * s;
    } else if (bits == 8u) {
      for (; i < end; ++i) out[i] = (float)((int32_t)d[i] - z) * s;
    } else {
      for (; i < end; ++i) out[i] = (float)((int32_t)squeeze_symbol(d, i, bits) - z) * s;
    }
    if (++c == channels) c = 0;
  }
}
/* value[j * per + t] = table[symbol_j * per + t] */
static void squeeze_decode_codebook(const uint8_t* d, uint32_t bits, const float* table, uint32_t symbols,
                                    uint32_t per, float* out) {
  for (uint32_t j = 0; j < symbols; ++j) {
    const uint32_t s = bits == 8u ? (uint32_t)d[j] : squeeze_symbol(d, j, bits);
    const float* row = table + s * per;
    for (uint32_t t = 0; t < per; ++t) *out++ = row[t];
  }
}
/* value[i] = table[symbol][t] * scale[c], i = j * per + t, c = (i / inner) % channels: the rebuild's Mul */
static void squeeze_decode_codebook_scaled(const uint8_t* d, uint32_t bits, const float* table, uint32_t symbols,
                                           uint32_t per, const float* scale, uint32_t inner, uint32_t channels,
                                           float* out) {
  uint32_t c = 0, left = inner;
  for (uint32_t j = 0; j < symbols; ++j) {
    const uint32_t s = bits == 8u ? (uint32_t)d[j] : squeeze_symbol(d, j, bits);
    const float* row = table + s * per;
    for (uint32_t t = 0; t < per; ++t) {
      *out++ = row[t] * scale[c];
      if (--left == 0u) {
        left = inner;
        if (++c == channels) c = 0;
      }
    }
  }
}
"""


def c_arrays(w: CompactWeight, key: str) -> dict[str, np.ndarray]:
    """The C arrays of a compact weight: `<key>_q` (stored bytes), `<key>_table`, `<key>_zero` (affine),
    `<key>_scale` (scaled codebook)."""
    arrays = {f"{key}_q": w.data, f"{key}_table": w.table.astype(np.float32)}
    if w.zero is not None:
        arrays[f"{key}_zero"] = w.zero.astype(np.int32)
    if w.scale is not None:
        arrays[f"{key}_scale"] = w.scale.astype(np.float32)
    return arrays


def c_decode_call(w: CompactWeight, key: str, out: str) -> str:
    """The C statement that decodes `w` (arrays named by `c_arrays(w, key)`) into `(float*)out`."""
    if w.kind == "affine":
        return (f"squeeze_decode_affine((const uint8_t*){key}_q_data, {w.bits}u, {int(w.signed)}, "
                f"(const float*){key}_table_data, (const int32_t*){key}_zero_data, {w.count}u, {w.inner}u, "
                f"{w.channels}u, (float*)({out}));")
    if w.scale is not None:
        return (f"squeeze_decode_codebook_scaled((const uint8_t*){key}_q_data, {w.bits}u, "
                f"(const float*){key}_table_data, {w.count // w.per}u, {w.per}u, (const float*){key}_scale_data, "
                f"{w.inner}u, {w.channels}u, (float*)({out}));")
    return (f"squeeze_decode_codebook((const uint8_t*){key}_q_data, {w.bits}u, (const float*){key}_table_data, "
            f"{w.count // w.per}u, {w.per}u, (float*)({out}));")


# ---------------------------------------------------------------------------------------------- report

WEIGHT_SLOT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def layer_rows(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], storage: Plan,
               as_float: set[str] = frozenset(), integer: dict[str, str] | None = None) -> list[dict]:
    """Per MAC-counted layer of `model`: MACs, its weight, how firmware stores it and what computes it.

    `storage` is `plan(model)` (or an empty Plan for weights=float); `as_float` the compact weights kept float;
    `integer` the weights (DequantizeLinear outputs) of the layers the int8 kernels compute.
    """
    from squeeze.metrics import node_macs  # noqa: PLC0415
    integer = integer or {}
    macs, _ = node_macs(model, shapes)
    by_layer = {layer: w for w in storage.weights for layer in w.layers}
    inits = {i.name: i for i in model.graph.initializer}
    int8_bytes = {n.output[0]: int(np.prod(inits[n.input[0]].dims, dtype=np.int64)) for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.output[0] in integer and n.input[0] in inits}
    rows = []
    for k, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{k}"
        if name not in macs:
            continue
        row = {"layer": name, "op": node.op_type, "macs": int(macs[name]), "compute": "float32"}
        w = by_layer.get(name)
        slot = WEIGHT_SLOT.get(node.op_type)
        source = node.input[slot] if slot is not None and len(node.input) > slot else ""
        if source in integer:
            row.update(weight=source, storage="int8", flash_bytes=int8_bytes.get(source), compute="int8",
                       float_bytes=4 * int8_bytes[source] if source in int8_bytes else None)
        elif w is not None and w.name not in as_float:
            row.update(weight=w.source, storage=w.storage, flash_bytes=w.stored_bytes + w.table_bytes,
                       float_bytes=w.float_bytes, decode="per layer into the RAM scratch")
        elif w is not None:
            row.update(weight=w.source, storage="float32 (kept float: decode scratch over the board's RAM)",
                       flash_bytes=w.float_bytes, float_bytes=w.float_bytes)
        else:
            init = inits.get(source)
            nbytes = 4 * int(np.prod(init.dims, dtype=np.int64)) if init is not None else None
            row.update(weight=source or None, storage="float32" if source else "none",
                       flash_bytes=nbytes, float_bytes=nbytes)
        rows.append(row)
    return rows
