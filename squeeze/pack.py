"""The packed container: a model's deployable weights, bit-packed and Huffman coded, plus honest size figures.

`pack(model)` writes a `.sqz` container and `unpack(data)` restores the ONNX model from it bit for bit
(`unpack(pack(m))` serializes to exactly the bytes of `m`; `pack` checks that before it returns). The container
is a compressed graph skeleton (the model with the weight payloads taken out) followed by one record per weight
tensor, each stored with whichever encoding is smallest (Han et al., "Deep Compression", ICLR 2016, §3; the
encodings themselves, which need no ONNX, are in `squeeze.codec`):

- `raw`: the tensor's bytes as they are;
- 8-bit integer tensors (codebook indices bit-packed by the `codebook` pass, int8 weights of `quant`) are read
  as a stream of b-bit symbols for every b that divides the stream, and Huffman coded (canonical code, decoder
  table of 4-bit code lengths counted in the record), or stored as a sparse structure when one symbol
  dominates: the gaps between the other symbols Huffman coded (capped at 255 with filler entries, as in Deep
  Compression) plus the remaining symbols;
- float tensors with at most 256 distinct values: the value table plus coded indices as above;
- float tensors with many exact zeros (unstructured pruning): coded gaps plus the non-zero values.

`size_report(model)` gives the three figures a report shows: the ONNX bytes, the container bytes (a real file,
the same bytes `squeeze pack` writes), and bits per parameter for every weight layer and overall, where a
layer's parameters are the elements of the weight its Conv/Gemm/MatMul consumes and its bits are those of every
stored tensor that the weight is rebuilt from.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .codec import (
    ENCODING_NAMES,
    PackError,
    Reader,
    decode_payload,
    encode_float,
    encode_int8,
    pack_bits,  # noqa: F401 (targets.weight_storage imports it from here)
    varint,
)
from .errors import OutputError
from .model import atomic_write, load_model, save_model

MAGIC = b"SQZPACK\x01"

_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
           TensorProto.BFLOAT16: np.uint16}
_BYTES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
          TensorProto.INT4: np.uint8, TensorProto.UINT4: np.uint8}  # 4-bit: two per byte, raw_data only
_NIBBLES = (TensorProto.INT4, TensorProto.UINT4)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---------------------------------------------------------------------------------------------- container

@dataclass
class Record:
    """One packed tensor: where it lives in the model, its name and the encoded payload."""

    location: int          # 0: graph initializer, 1: Constant node `value` attribute
    index: int             # initializer index, or node index
    name: str
    storage: int           # 0: raw_data, 1: typed field
    payload: bytes
    elements: int

    @property
    def encoding(self) -> str:
        return ENCODING_NAMES.get(self.payload[0], "?")

    @property
    def nbytes(self) -> int:
        return len(self.payload)


@dataclass
class Packed:
    data: bytes
    records: list[Record] = field(default_factory=list)
    skeleton_bytes: int = 0


def _dtype_of(tensor: TensorProto) -> np.dtype | None:
    np_type = _FLOATS.get(tensor.data_type) or _BYTES.get(tensor.data_type)
    return np.dtype(np_type) if np_type is not None else None


def _stored_count(tensor: TensorProto) -> int:
    """Elements of the stored array: the tensor's elements, or its bytes for 4-bit types."""
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return (count + 1) // 2 if tensor.data_type in _NIBBLES else count


def _tensors(model: onnx.ModelProto):
    """(location, index, graph name, tensor) for the main graph's initializers and Constant node values."""
    for i, t in enumerate(model.graph.initializer):
        yield 0, i, t.name, t
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    yield 1, i, node.output[0], attr.t


def _field_values(arr: np.ndarray, tensor: TensorProto) -> tuple[str, list]:
    """The typed field and its values that encode `arr` the way ONNX stores `tensor`'s data type."""
    if tensor.data_type == TensorProto.FLOAT:
        return "float_data", arr.tolist()
    if tensor.data_type == TensorProto.DOUBLE:
        return "double_data", arr.tolist()
    if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return "int32_data", arr.view(np.uint16).astype(np.int32).tolist()
    return "int32_data", arr.astype(np.int32).tolist()


def _restore(tensor: TensorProto, arr: np.ndarray, storage: int) -> None:
    if storage == 0:
        tensor.raw_data = arr.tobytes()
    else:
        name, values = _field_values(arr, tensor)
        getattr(tensor, name).extend(values)


def _strip(tensor: TensorProto) -> None:
    for name in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
        tensor.ClearField(name)


def _array(tensor: TensorProto, dtype: np.dtype) -> tuple[np.ndarray, int] | None:
    """(flat array, storage) of a tensor stored in memory; None when it lives in external data."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return None
    count = _stored_count(tensor)
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != count * dtype.itemsize:
            return None
        return np.frombuffer(tensor.raw_data, dtype).copy(), 0
    if tensor.data_type in _NIBBLES:
        return None
    name = {TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data"}.get(tensor.data_type, "int32_data")
    values = list(getattr(tensor, name))
    if len(values) != count:
        return None
    if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        arr = np.array(values, np.int32).astype(np.uint16).view(dtype)
    else:
        arr = np.array(values).astype(dtype)
    return arr, 1


def pack(model: onnx.ModelProto, verify: bool = True) -> Packed:
    """Pack `model` into a container; with `verify`, prove that `unpack` restores it byte for byte."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    records: list[Record] = []
    for location, index, name, tensor in _tensors(skeleton):
        dtype = _dtype_of(tensor)
        got = _array(tensor, dtype) if dtype is not None else None
        if got is None:
            continue
        arr, storage = got
        if arr.size < 16:
            continue  # scalars and tiny tensors stay in the skeleton: a record would cost more than it saves
        probe = TensorProto()
        probe.CopyFrom(tensor)
        _strip(probe)
        _restore(probe, arr, storage)
        if probe.SerializeToString() != tensor.SerializeToString():
            continue  # an unusual storage form: keep it verbatim in the skeleton
        payload = encode_int8(arr) if dtype.kind in "iu" and dtype.itemsize == 1 else encode_float(arr)
        _strip(tensor)
        records.append(Record(location, index, name, storage, payload, int(arr.size)))
    body = zlib.compress(skeleton.SerializeToString(deterministic=True), 9)
    parts = [MAGIC, varint(len(body)), body, varint(len(records))]
    for r in records:
        parts += [bytes([r.location]), varint(r.index), bytes([r.storage]), varint(len(r.payload)), r.payload]
    packed = Packed(b"".join(parts), records, len(body))
    if verify:
        restored = unpack(packed.data)
        if restored.SerializeToString(deterministic=True) != model.SerializeToString(deterministic=True):
            raise PackError("internal error: the packed container does not restore the model exactly")
    return packed


def unpack(data: bytes) -> onnx.ModelProto:
    """Restore the ONNX model from a container written by `pack`."""
    if not data.startswith(MAGIC):
        raise PackError("not a squeeze packed container (bad magic); was it written by 'squeeze pack'?")
    reader = Reader(data, len(MAGIC))
    try:
        body = zlib.decompress(reader.take(reader.varint()))
    except zlib.error as exc:
        raise PackError(f"corrupt container: {exc}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise PackError(f"corrupt container: graph skeleton does not parse ({exc})") from None
    places = {}
    for location, index, _, tensor in _tensors(model):
        places[(location, index)] = tensor
    for _ in range(reader.varint()):
        location, index, storage = reader.byte(), reader.varint(), reader.byte()
        payload = reader.take(reader.varint())
        tensor = places.get((location, index))
        dtype = _dtype_of(tensor) if tensor is not None else None
        if dtype is None:
            raise PackError("corrupt container: a record points at no weight tensor")
        _restore(tensor, decode_payload(payload, dtype, _stored_count(tensor)), storage)
    if reader.pos != len(data):
        raise PackError("corrupt container: trailing bytes")
    return model


# ---------------------------------------------------------------------------------------------- size accounting

def weight_layers(model: onnx.ModelProto) -> list[tuple[str, str, list[str]]]:
    """(layer name, weight tensor, stored tensors it is rebuilt from) for every Conv/ConvTranspose/Gemm/MatMul.

    A weight is traced back through nodes whose inputs are all constant (a codebook rebuild, a
    DequantizeLinear of int8 weights) to the initializers and Constant nodes it comes from; layers whose weight
    is computed from the model input are left out.
    """
    g = model.graph
    constant = {t.name for t in g.initializer}  # IR < 4 lists them as inputs too; they are still the weights
    producer = {}
    for node in g.node:
        for out in node.output:
            producer[out] = node
    sources: dict[str, frozenset[str] | None] = {}

    def trace(name: str) -> frozenset[str] | None:
        if name in sources:
            return sources[name]
        sources[name] = None  # cycle guard
        if name in constant:
            result: frozenset[str] | None = frozenset([name])
        elif name in producer:
            node = producer[name]
            if node.op_type == "Constant":
                result = frozenset([name])
            else:
                parts = [trace(i) for i in node.input if i]
                result = None if any(p is None for p in parts) or not parts else frozenset().union(*parts)
        else:
            result = None
        sources[name] = result
        return result

    layers = []
    for i, node in enumerate(g.node):
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        candidates = [node.input[1]] if node.op_type != "MatMul" else [node.input[1], node.input[0]]
        for weight in candidates:
            found = trace(weight)
            if found:
                layers.append((node.name or f"{node.op_type}_{i}", weight, sorted(found)))
                break
    return layers


def _element_counts(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    counts = {}
    for t in model.graph.initializer:
        if t.name in names:
            counts[t.name] = int(np.prod(t.dims))
    missing = names - set(counts)
    if missing:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # inference is best effort; unknown layers are left out of the per-layer table
            inferred = model
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            if v.name in missing:
                dims = v.type.tensor_type.shape.dim
                if dims and all(d.HasField("dim_value") for d in dims):
                    counts[v.name] = int(np.prod([d.dim_value for d in dims]))
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output[0] in missing:
                for attr in node.attribute:
                    if attr.name == "value":
                        counts[node.output[0]] = int(np.prod(attr.t.dims))
    return counts


def size_report(model: onnx.ModelProto, packed: Packed | None = None) -> dict:
    """`packed` (container bytes), `packed_weights` (bytes of the weight records, decoder tables included) and
    `bits_per_param` (`overall` and per layer: packed bits of what the layer's weight is rebuilt from, per element
    of that weight)."""
    packed = packed or pack(model, verify=False)
    record_bytes = {r.name: r.nbytes for r in packed.records}
    inline = {}  # weight-like tensors too small for a record: their bytes as stored in the skeleton
    for _, _, name, tensor in _tensors(model):
        if _dtype_of(tensor) is not None and name not in record_bytes:
            inline[name] = tensor.ByteSize()
    layers = weight_layers(model)
    counts = _element_counts(model, {w for _, w, _ in layers})
    users: dict[str, int] = {}
    for _, _, stored in layers:
        for s in stored:
            users[s] = users.get(s, 0) + 1
    per_layer, covered, layer_params, layer_bits = {}, set(), 0, 0.0
    for name, weight, stored in layers:
        if weight not in counts or counts[weight] == 0:
            continue
        bits = 8.0 * sum((record_bytes.get(s, 0) + inline.get(s, 0)) / users[s] for s in stored)
        per_layer[name] = round(bits / counts[weight], 4)
        covered.update(stored)
        layer_params += counts[weight]
        layer_bits += bits
    other_params = 0
    for _, _, name, tensor in _tensors(model):
        if name not in covered and _dtype_of(tensor) is not None:
            other_params += int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    other_bits = 8.0 * sum(v for k, v in record_bytes.items() if k not in covered) \
        + 8.0 * sum(v for k, v in inline.items() if k not in covered)
    total_params = layer_params + other_params
    overall = (layer_bits + other_bits) / total_params if total_params else 0.0
    return {"packed": len(packed.data),
            "packed_weights": int(sum(record_bytes.values()) + sum(inline.values())),
            "bits_per_param": {"overall": round(overall, 4), "layers": per_layer}}


# ---------------------------------------------------------------------------------------------- files

def pack_file(model_path: str | os.PathLike, out_path: str | os.PathLike, force: bool = False) -> dict:
    """Write the container of the ONNX file `model_path` to `out_path` (atomically); return its size report."""
    model_path, out_path = Path(model_path), Path(out_path)
    _check_output(model_path, out_path, force)
    model = load_model(model_path)
    packed = pack(model)
    atomic_write(out_path, packed.data)
    report = size_report(model, packed)
    report["onnx"] = model_path.stat().st_size
    report["encodings"] = {r.name: r.encoding for r in packed.records}
    return report


def unpack_file(packed_path: str | os.PathLike, out_path: str | os.PathLike, force: bool = False) -> onnx.ModelProto:
    """Restore the ONNX model in the container `packed_path` to `out_path`."""
    packed_path, out_path = Path(packed_path), Path(out_path)
    if not packed_path.is_file():
        raise PackError(f"{packed_path}: no such file")
    _check_output(packed_path, out_path, force)
    model = unpack(packed_path.read_bytes())
    save_model(model, out_path)
    return model


def _check_output(source: Path, out: Path, force: bool) -> None:
    if out.exists() and out.resolve() == source.resolve():
        raise OutputError(f"{out}: is the input file; choose another -o")
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; choose another -o or pass --force to replace it")
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; refusing to write through it")


def describe(report: dict, out: Path) -> str:
    """What `squeeze pack` prints: the three size figures and the bits per parameter of every layer."""
    bits = report["bits_per_param"]
    lines = [f"wrote {out}: {report['packed']:,} bytes (ONNX file {report['onnx']:,} bytes, "
             f"{report['onnx'] / max(report['packed'], 1):.2f}× smaller); weights {report['packed_weights']:,} bytes, "
             f"{bits['overall']:.3f} bits/param overall"]
    width = max((len(k) for k in bits["layers"]), default=0)
    for name, value in bits["layers"].items():
        lines.append(f"  {name.ljust(width)}  {value:7.3f} bits/param")
    return "\n".join(lines)
