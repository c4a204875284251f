"""The packed container: a model's deployable weights, bit-packed and Huffman coded, plus honest size figures.

`pack(model)` writes a `.sqz` container and `unpack(data)` restores the ONNX model from it bit for bit
(`unpack(pack(m))` serializes to exactly the bytes of `m`; `pack` checks that before it returns). The container
is a compressed graph skeleton (the model with the weight payloads taken out) followed by one record per weight
tensor, each stored with whichever encoding is smallest (Han et al., "Deep Compression", ICLR 2016, §3):

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

import heapq
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .errors import OutputError, SqueezeError
from .model import atomic_write, load_model, save_model

MAGIC = b"SQZPACK\x01"
MAX_CODE_LENGTH = 15          # code lengths fit a nibble in the decoder table
GAP_FILLER = 255              # a gap symbol of 255 means "255 zeros, no element" (Deep Compression's filler)

# Encodings of a record.
RAW, INT_SYMBOLS, FLOAT_DICT, FLOAT_SPARSE = 0, 1, 2, 3
ENCODING_NAMES = {RAW: "raw", INT_SYMBOLS: "symbols", FLOAT_DICT: "dictionary", FLOAT_SPARSE: "sparse"}
# Encodings of a symbol stream inside a record.
STREAM_FIXED, STREAM_HUFFMAN, STREAM_SPARSE = 0, 1, 2

_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
           TensorProto.BFLOAT16: np.uint16}
_BYTES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
          TensorProto.INT4: np.uint8, TensorProto.UINT4: np.uint8}  # 4-bit: two per byte, raw_data only
_NIBBLES = (TensorProto.INT4, TensorProto.UINT4)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class PackError(SqueezeError):
    """A packed container is damaged or not a squeeze container."""


# ---------------------------------------------------------------------------------------------- bit streams

def pack_bits(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Pack symbols < 2**bits into uint8 [G, bits]: groups of 8 symbols, least significant bit first.

    Group g holds symbols 8g..8g+7 as the little-endian integer Σ s_{8g+k}·2^(bits·k) (a plain LSB-first bit
    stream), which the ONNX rebuild (`passes.weights.Builder.indices`) decodes with Gather, Mul, Div and Sub.
    The tail is padded with 0.
    """
    if not 1 <= bits <= 8:
        raise ValueError("bits must be in 1..8")
    sym = np.asarray(symbols).astype(np.int64).ravel()
    if sym.size and (sym.min() < 0 or sym.max() >= 1 << bits):
        raise ValueError(f"symbols do not fit in {bits} bits")
    groups = -(-sym.size // 8)
    padded = np.zeros(groups * 8, np.uint8)
    padded[:sym.size] = sym
    stream = ((padded[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little").reshape(groups, bits)


def unpack_bits(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` symbols (all 8·G when None) as int64."""
    stream = np.unpackbits(np.ascontiguousarray(packed, dtype=np.uint8).ravel(), bitorder="little")
    usable = stream.size - stream.size % bits
    symbols = (stream[:usable].reshape(-1, bits).astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return symbols if count is None else symbols[:count]


# ---------------------------------------------------------------------------------------------- Huffman coding

def huffman_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol `counts` (0 for absent symbols), limited to `max_length` bits.

    When the optimal code is deeper than the limit, the counts are flattened (halved, kept ≥ 1) and the code
    rebuilt, the usual practical remedy; the loss against the optimum is negligible at 15 bits.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, np.int64)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present[0]] = 1
        return lengths
    weights = counts[present].copy()
    while True:
        heap = [(int(w), i, (int(s),)) for i, (w, s) in enumerate(zip(weights, present))]
        heapq.heapify(heap)
        depth = {int(s): 0 for s in present}
        tie = len(heap)
        while len(heap) > 1:
            w1, _, s1 = heapq.heappop(heap)
            w2, _, s2 = heapq.heappop(heap)
            for s in s1 + s2:
                depth[s] += 1
            heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
            tie += 1
        if max(depth.values()) <= max_length:
            break
        weights = np.maximum(weights // 2, 1)
    for s, d in depth.items():
        lengths[s] = d
    return lengths


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (as integers) for code `lengths`, assigned in (length, symbol) order."""
    codes = np.zeros(lengths.size, np.int64)
    order = sorted((int(l), s) for s, l in enumerate(lengths) if l > 0)
    code, prev = 0, order[0][0] if order else 0
    for i, (length, s) in enumerate(order):
        if i:
            code = (code + 1) << (length - prev)
        prev = length
        codes[s] = code
    return codes


def huffman_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    return int((np.asarray(counts, np.int64) * lengths).sum())


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate the canonical codes of `symbols` (most significant bit first), padded to whole bytes."""
    symbols = np.asarray(symbols, np.int64)
    if symbols.size == 0:
        return b""
    codes = _canonical_codes(lengths)
    sym_len, sym_code = lengths[symbols], codes[symbols]
    ends = np.cumsum(sym_len)
    starts = ends - sym_len
    out = np.zeros(int(ends[-1]), np.uint8)
    for j in range(int(sym_len.max())):
        has = sym_len > j
        out[starts[has] + j] = (sym_code[has] >> (sym_len[has] - 1 - j)) & 1
    return np.packbits(out).tobytes()


def huffman_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode `count` symbols coded with the canonical code of `lengths` (table lookup on 15-bit windows)."""
    if count == 0:
        return np.zeros(0, np.int64)
    present = np.flatnonzero(lengths)
    if present.size == 0:
        raise PackError("corrupt container: empty Huffman table for a non-empty stream")
    codes = _canonical_codes(lengths)
    width = int(lengths.max())
    table_sym = np.zeros(1 << width, np.int64)
    table_len = np.zeros(1 << width, np.int64)
    for s in present:
        length = int(lengths[s])
        first = int(codes[s]) << (width - length)
        table_sym[first:first + (1 << (width - length))] = s
        table_len[first:first + (1 << (width - length))] = length
    bits = np.concatenate([np.unpackbits(np.frombuffer(data, np.uint8)), np.zeros(width, np.uint8)])
    windows = np.zeros(bits.size - width, np.int32)
    for j in range(width):
        windows = (windows << 1) | bits[j:j + windows.size]
    step = table_len[windows].tolist()
    symbol_at = table_sym[windows]
    positions = np.empty(count, np.int64)
    pos, limit = 0, len(step)
    for i in range(count):
        if pos >= limit:
            raise PackError("corrupt container: Huffman stream ends early")
        positions[i] = pos
        pos += step[pos] or limit  # a zero length marks an invalid code
    if pos > limit:
        raise PackError("corrupt container: invalid Huffman code")
    return symbol_at[positions]


# ---------------------------------------------------------------------------------------------- varints

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def varint(self) -> int:
        shift = value = 0
        while True:
            if self.pos >= self.end:
                raise PackError("corrupt container: truncated")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise PackError("corrupt container: truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]


# ---------------------------------------------------------------------------------------------- symbol streams

def _table_bytes(alphabet_bits: int) -> int:
    return ((1 << alphabet_bits) + 1) // 2


def _write_table(lengths: np.ndarray, alphabet_bits: int) -> bytes:
    nibbles = np.zeros(2 * _table_bytes(alphabet_bits), np.uint8)
    nibbles[:lengths.size] = lengths
    return bytes((nibbles[0::2] | (nibbles[1::2] << 4)).tolist())


def _read_table(reader: _Reader, alphabet_bits: int) -> np.ndarray:
    raw = np.frombuffer(reader.take(_table_bytes(alphabet_bits)), np.uint8)
    nibbles = np.empty(raw.size * 2, np.int64)
    nibbles[0::2], nibbles[1::2] = raw & 15, raw >> 4
    return nibbles[:1 << alphabet_bits]


def _gaps(mask: np.ndarray) -> np.ndarray:
    """Gap symbols (zeros before each marked position, capped at 255 with fillers) of a boolean mask."""
    where = np.flatnonzero(mask)
    gaps = np.diff(np.concatenate([[-1], where])) - 1
    fillers = gaps // GAP_FILLER
    if fillers.max(initial=0) == 0:
        return gaps.astype(np.int64)
    counts = fillers + 1
    out = np.full(int(counts.sum()), GAP_FILLER, np.int64)
    out[np.cumsum(counts) - 1] = gaps - fillers * GAP_FILLER
    return out


def _positions(gaps: np.ndarray) -> np.ndarray:
    """Inverse of `_gaps`: the marked positions."""
    advance = gaps + 1
    advance[gaps == GAP_FILLER] = GAP_FILLER
    ends = np.cumsum(advance) - 1
    return ends[gaps != GAP_FILLER]


def _huffman_size(symbols: np.ndarray, alphabet_bits: int) -> tuple[int, np.ndarray, np.ndarray]:
    counts = np.bincount(symbols, minlength=1 << alphabet_bits)
    lengths = huffman_lengths(counts)
    return _table_bytes(alphabet_bits) + -(-huffman_bits(counts, lengths) // 8), counts, lengths


def encode_stream(symbols: np.ndarray, alphabet_bits: int) -> bytes:
    """The smallest of: fixed-width bits, Huffman, or sparse (gaps + non-zero symbols, both Huffman coded)."""
    symbols = np.asarray(symbols, np.int64)
    fixed = b"".join([bytes([STREAM_FIXED]), pack_bits(symbols, alphabet_bits).tobytes()]) \
        if alphabet_bits <= 8 else None
    huff_size, _, lengths = _huffman_size(symbols, alphabet_bits)
    candidates = []
    if fixed is not None:
        candidates.append((len(fixed), STREAM_FIXED))
    candidates.append((1 + huff_size, STREAM_HUFFMAN))
    nonzero = symbols != 0
    if symbols.size and nonzero.mean() < 0.5:
        gaps = _gaps(nonzero)
        gap_size, _, _ = _huffman_size(gaps, 8)
        rest_size, _, _ = _huffman_size(symbols[nonzero], alphabet_bits)
        candidates.append((1 + len(_varint(gaps.size)) + gap_size + rest_size, STREAM_SPARSE))
    best = min(candidates)[1]
    if best == STREAM_FIXED:
        return fixed
    if best == STREAM_HUFFMAN:
        return bytes([STREAM_HUFFMAN]) + _write_table(lengths, alphabet_bits) + huffman_encode(symbols, lengths)
    gaps = _gaps(nonzero)
    _, _, gap_lengths = _huffman_size(gaps, 8)
    rest = symbols[nonzero]
    _, _, rest_lengths = _huffman_size(rest, alphabet_bits)
    gap_code = huffman_encode(gaps, gap_lengths)
    return b"".join([bytes([STREAM_SPARSE]), _varint(gaps.size), _write_table(gap_lengths, 8),
                     _varint(len(gap_code)), gap_code, _write_table(rest_lengths, alphabet_bits),
                     huffman_encode(rest, rest_lengths)])


def decode_stream(reader: _Reader, alphabet_bits: int, count: int) -> np.ndarray:
    kind = reader.byte()
    if kind == STREAM_FIXED:
        groups = -(-count // 8)
        return unpack_bits(np.frombuffer(reader.take(groups * alphabet_bits), np.uint8), alphabet_bits, count)
    if kind == STREAM_HUFFMAN:
        lengths = _read_table(reader, alphabet_bits)
        return huffman_decode(reader.take(reader.end - reader.pos), lengths, count)
    if kind == STREAM_SPARSE:
        n_gaps = reader.varint()
        gap_lengths = _read_table(reader, 8)
        gap_code = reader.take(reader.varint())
        gaps = huffman_decode(gap_code, gap_lengths, n_gaps)
        where = _positions(gaps)
        rest_lengths = _read_table(reader, alphabet_bits)
        rest = huffman_decode(reader.take(reader.end - reader.pos), rest_lengths, where.size)
        if where.size and where[-1] >= count:
            raise PackError("corrupt container: sparse positions out of range")
        out = np.zeros(count, np.int64)
        out[where] = rest
        return out
    raise PackError(f"corrupt container: unknown stream encoding {kind}")


# ---------------------------------------------------------------------------------------------- tensor records

def _symbol_widths(nbytes: int) -> list[int]:
    """Symbol widths b for which a byte stream splits into whole b-bit symbols."""
    return [b for b in range(1, 9) if (8 * nbytes) % b == 0]


def _encode_int8(arr: np.ndarray) -> bytes:
    """Raw, or the byte stream read as b-bit symbols (best b by estimated size) and coded."""
    data = np.ascontiguousarray(arr).view(np.uint8).ravel()
    best: tuple[int, int] | None = None
    for b in _symbol_widths(data.size):
        symbols = unpack_bits(data, b) if b < 8 else data.astype(np.int64)
        size = min(_huffman_size(symbols, b)[0], data.size)
        nonzero = symbols != 0
        if nonzero.mean() < 0.5:
            size = min(size, _huffman_size(_gaps(nonzero), 8)[0] + _huffman_size(symbols[nonzero], b)[0])
        if best is None or size < best[0]:
            best = (size, b)
    if best is None or best[0] >= data.size:
        return bytes([RAW]) + data.tobytes()
    b = best[1]
    symbols = unpack_bits(data, b) if b < 8 else data.astype(np.int64)
    coded = bytes([INT_SYMBOLS, b]) + encode_stream(symbols, b)
    return coded if len(coded) < 1 + data.size else bytes([RAW]) + data.tobytes()


def _encode_float(arr: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(arr).ravel()
    raw = bytes([RAW]) + flat.tobytes()
    best = raw
    bits_view = flat.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[flat.itemsize])
    values, inverse = np.unique(bits_view, return_inverse=True)  # by bit pattern: -0.0 and NaNs stay exact
    if values.size <= 256 and flat.size > values.size:
        alphabet = max(1, int(np.ceil(np.log2(max(values.size, 2)))))
        order = np.argsort(values != 0, kind="stable")  # the zero pattern, if present, gets index 0
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        table = values[order]
        coded = b"".join([bytes([FLOAT_DICT]), _varint(values.size), table.tobytes(),
                          encode_stream(rank[inverse.ravel()], alphabet)])
        best = min(best, coded, key=len)
    nonzero = bits_view != 0
    if nonzero.mean() < 0.5:
        gaps = _gaps(nonzero)
        gap_size, _, lengths = _huffman_size(gaps, 8)
        if 1 + gap_size + nonzero.sum() * flat.itemsize < len(best):
            gap_code = huffman_encode(gaps, lengths)
            coded = b"".join([bytes([FLOAT_SPARSE]), _varint(gaps.size), _write_table(lengths, 8),
                              _varint(len(gap_code)), gap_code, flat[nonzero].tobytes()])
            best = min(best, coded, key=len)
    return best


def _decode_payload(payload: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    reader = _Reader(payload)
    kind = reader.byte()
    if kind == RAW:
        return np.frombuffer(reader.take(count * dtype.itemsize), dtype).copy()
    if kind == INT_SYMBOLS:
        b = reader.byte()
        nbytes = count * dtype.itemsize
        symbols = decode_stream(reader, b, nbytes * 8 // b)
        data = symbols.astype(np.uint8) if b == 8 else pack_bits(symbols, b).ravel()[:nbytes]
        return data.view(dtype).copy()
    uint = np.dtype({2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize])
    if kind == FLOAT_DICT:
        size = reader.varint()
        table = np.frombuffer(reader.take(size * uint.itemsize), uint)
        alphabet = max(1, int(np.ceil(np.log2(max(size, 2)))))
        index = decode_stream(reader, alphabet, count)
        if index.size and index.max() >= size:
            raise PackError("corrupt container: dictionary index out of range")
        return table[index].view(dtype).copy()
    if kind == FLOAT_SPARSE:
        n_gaps = reader.varint()
        lengths = _read_table(reader, 8)
        where = _positions(huffman_decode(reader.take(reader.varint()), lengths, n_gaps))
        values = np.frombuffer(reader.take(reader.end - reader.pos), uint)
        if values.size != where.size or (where.size and where[-1] >= count):
            raise PackError("corrupt container: sparse record does not match its tensor")
        out = np.zeros(count, uint)
        out[where] = values
        return out.view(dtype)
    raise PackError(f"corrupt container: unknown record encoding {kind}")


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
        payload = _encode_int8(arr) if dtype.kind in "iu" and dtype.itemsize == 1 else _encode_float(arr)
        _strip(tensor)
        records.append(Record(location, index, name, storage, payload, int(arr.size)))
    body = zlib.compress(skeleton.SerializeToString(deterministic=True), 9)
    parts = [MAGIC, _varint(len(body)), body, _varint(len(records))]
    for r in records:
        parts += [bytes([r.location]), _varint(r.index), bytes([r.storage]), _varint(len(r.payload)), r.payload]
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
    reader = _Reader(data, len(MAGIC))
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
        _restore(tensor, _decode_payload(payload, dtype, _stored_count(tensor)), storage)
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
