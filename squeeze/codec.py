"""Pure byte/array codec of the packed container (no ONNX): bit packing, canonical Huffman coding, symbol streams
and the tensor record encodings (Han et al., "Deep Compression", ICLR 2016, §3).

- `pack_bits`/`unpack_bits`: b-bit symbols ↔ an LSB-first byte stream (also what the `codebook` pass stores and
  its ONNX rebuild decodes);
- `encode_stream`/`decode_stream`: a symbol stream as the smallest of fixed-width bits, Huffman (canonical code,
  decoder table of 4-bit code lengths), or sparse (gaps between non-zero symbols Huffman coded, capped at 255
  with filler entries, plus the non-zero symbols);
- `encode_int8`/`encode_float`/`decode_payload`: one flat array → the smallest record payload (`raw`, b-bit
  `symbols`, float `dictionary` of at most 256 values, float `sparse`).

`squeeze.pack` wraps these in the container (ONNX model ↔ packed file).
"""
from __future__ import annotations

import heapq

import numpy as np

from .errors import SqueezeError

MAX_CODE_LENGTH = 15          # code lengths fit a nibble in the decoder table
GAP_FILLER = 255              # a gap symbol of 255 means "255 zeros, no element" (Deep Compression's filler)

# Encodings of a record.
RAW, INT_SYMBOLS, FLOAT_DICT, FLOAT_SPARSE = 0, 1, 2, 3
ENCODING_NAMES = {RAW: "raw", INT_SYMBOLS: "symbols", FLOAT_DICT: "dictionary", FLOAT_SPARSE: "sparse"}
# Encodings of a symbol stream inside a record.
STREAM_FIXED, STREAM_HUFFMAN, STREAM_SPARSE = 0, 1, 2


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

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Reader:
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


def _read_table(reader: Reader, alphabet_bits: int) -> np.ndarray:
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
        candidates.append((1 + len(varint(gaps.size)) + gap_size + rest_size, STREAM_SPARSE))
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
    return b"".join([bytes([STREAM_SPARSE]), varint(gaps.size), _write_table(gap_lengths, 8),
                     varint(len(gap_code)), gap_code, _write_table(rest_lengths, alphabet_bits),
                     huffman_encode(rest, rest_lengths)])


def decode_stream(reader: Reader, alphabet_bits: int, count: int) -> np.ndarray:
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


def encode_int8(arr: np.ndarray) -> bytes:
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


def encode_float(arr: np.ndarray) -> bytes:
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
        coded = b"".join([bytes([FLOAT_DICT]), varint(values.size), table.tobytes(),
                          encode_stream(rank[inverse.ravel()], alphabet)])
        best = min(best, coded, key=len)
    nonzero = bits_view != 0
    if nonzero.mean() < 0.5:
        gaps = _gaps(nonzero)
        gap_size, _, lengths = _huffman_size(gaps, 8)
        if 1 + gap_size + nonzero.sum() * flat.itemsize < len(best):
            gap_code = huffman_encode(gaps, lengths)
            coded = b"".join([bytes([FLOAT_SPARSE]), varint(gaps.size), _write_table(lengths, 8),
                              varint(len(gap_code)), gap_code, flat[nonzero].tobytes()])
            best = min(best, coded, key=len)
    return best


def decode_payload(payload: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    reader = Reader(payload)
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
