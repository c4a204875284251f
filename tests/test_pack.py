"""The packed container: bit packing, Huffman coding, lossless round trips, and the size figures of the report."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from squeeze import codec, pack
from squeeze.cli import main


def _identical(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------- bit streams

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001])
def test_pack_bits_round_trip(bits, count):
    symbols = np.random.default_rng(bits * 1000 + count).integers(0, 1 << bits, count)
    packed = codec.pack_bits(symbols, bits)
    assert packed.dtype == np.uint8 and packed.shape == (-(-count // 8), bits)
    assert np.array_equal(codec.unpack_bits(packed, bits, count), symbols)


def test_pack_bits_layout_is_little_endian_groups():
    # group of 8 three-bit symbols = one 24-bit little-endian word: Σ s_k · 8^k
    symbols = np.array([1, 2, 3, 4, 5, 6, 7, 0])
    word = sum(int(s) << (3 * k) for k, s in enumerate(symbols))
    assert codec.pack_bits(symbols, 3).ravel().tolist() == [word & 255, (word >> 8) & 255, word >> 16]


def test_pack_bits_rejects_symbols_that_do_not_fit():
    with pytest.raises(ValueError):
        codec.pack_bits(np.array([4]), 2)


# ---------------------------------------------------------------------------------------------- Huffman

def test_huffman_lengths_are_optimal_and_prefix_free():
    counts = np.array([45, 13, 12, 16, 9, 5])  # the textbook example: optimal lengths 1,3,3,3,4,4
    lengths = codec.huffman_lengths(counts)
    assert sorted(lengths.tolist()) == [1, 3, 3, 3, 4, 4]
    assert codec.huffman_bits(counts, lengths) == 224
    assert np.sum(2.0 ** -lengths[lengths > 0]) <= 1.0  # Kraft


def test_huffman_lengths_are_limited():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])  # Fibonacci counts make the deepest unrestricted code
    lengths = codec.huffman_lengths(np.array(fib))
    assert lengths.max() <= codec.MAX_CODE_LENGTH
    assert np.sum(2.0 ** -lengths.astype(float)) <= 1.0


@pytest.mark.parametrize("skew", [0.05, 1.0, 50.0])
@pytest.mark.parametrize("bits", [1, 3, 4, 6, 8])
def test_huffman_round_trip(bits, skew):
    rng = np.random.default_rng(bits)
    p = rng.dirichlet(np.full(1 << bits, skew))
    symbols = rng.choice(1 << bits, size=3000, p=p)
    lengths = codec.huffman_lengths(np.bincount(symbols, minlength=1 << bits))
    data = codec.huffman_encode(symbols, lengths)
    assert len(data) == -(-codec.huffman_bits(np.bincount(symbols, minlength=1 << bits), lengths) // 8)
    assert np.array_equal(codec.huffman_decode(data, lengths, symbols.size), symbols)


def test_single_symbol_stream():
    symbols = np.full(100, 5)
    enc = codec.encode_stream(symbols, 4)
    assert np.array_equal(codec.decode_stream(codec.Reader(enc), 4, 100), symbols)
    assert len(enc) < 30  # one bit per symbol (plus the table), not four


def test_sparse_stream_wins_when_zeros_dominate():
    rng = np.random.default_rng(0)
    symbols = np.where(rng.random(20000) < 0.03, rng.integers(1, 16, 20000), 0)
    symbols[-1] = 0
    enc = codec.encode_stream(symbols, 4)
    assert enc[0] == codec.STREAM_SPARSE
    assert np.array_equal(codec.decode_stream(codec.Reader(enc), 4, symbols.size), symbols)
    # long runs need filler gaps (≥ 255 zeros between non-zeros)
    runs = np.zeros(5000, np.int64)
    runs[[0, 600, 4999]] = [3, 1, 2]
    enc = codec.encode_stream(runs, 2)
    assert np.array_equal(codec.decode_stream(codec.Reader(enc), 2, runs.size), runs)


# ---------------------------------------------------------------------------------------------- containers

@pytest.mark.parametrize("build", list(graphs.LOSSLESS.values()), ids=list(graphs.LOSSLESS))
def test_container_round_trip_is_bit_exact(build):
    model = build()
    packed = pack.pack(model)
    assert _identical(pack.unpack(packed.data), model)


def _model_with(tensor: onnx.TensorProto, op_input: str = "w") -> onnx.ModelProto:
    node = helper.make_node("Identity", [op_input], ["y"])
    output = helper.make_tensor_value_info("y", tensor.data_type, list(tensor.dims))
    graph = helper.make_graph([node], "g", [], [output], [tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("tensor", [
    helper.make_tensor("w", TensorProto.FLOAT, [40], np.linspace(-1, 1, 40).tolist()),             # float_data
    numpy_helper.from_array(np.linspace(-1, 1, 64).astype(np.float16), "w"),                        # raw fp16
    helper.make_tensor("w", TensorProto.FLOAT16, [32], np.linspace(-2, 2, 32).astype(np.float16)),  # int32_data
    numpy_helper.from_array(np.arange(-60, 60, dtype=np.int8), "w"),                                # raw int8
    helper.make_tensor("w", TensorProto.INT8, [50], list(range(-25, 25))),                          # int32_data
    helper.make_tensor("w", TensorProto.DOUBLE, [20], np.arange(20.0).tolist()),                    # double_data
    numpy_helper.from_array(np.array([0.0, -0.0, np.nan, np.inf] * 10, np.float32), "w"),           # odd values
], ids=["float_data", "fp16_raw", "fp16_int32_data", "int8_raw", "int8_int32_data", "double", "signed_zero_nan"])
def test_every_storage_form_round_trips(tensor):
    model = _model_with(tensor)
    assert _identical(pack.unpack(pack.pack(model).data), model)


def test_constant_node_values_are_packed():
    values = np.repeat(np.arange(4, dtype=np.float32), 100)
    node = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(values, "c_value"))
    graph = helper.make_graph([node, helper.make_node("Identity", ["c"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [400])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    packed = pack.pack(model)
    assert [r.encoding for r in packed.records] == ["dictionary"]
    assert packed.records[0].nbytes < 120  # 400 values of 4 kinds: 2 bits each, not 32
    assert _identical(pack.unpack(packed.data), model)


def test_sparse_float_weights_use_the_sparse_structure():
    rng = np.random.default_rng(0)
    w = np.where(rng.random(10000) < 0.1, rng.standard_normal(10000), 0).astype(np.float32)
    model = _model_with(numpy_helper.from_array(w, "w"))
    packed = pack.pack(model)
    assert packed.records[0].encoding == "sparse"
    assert packed.records[0].nbytes < 0.2 * w.nbytes  # 10 % of the values, plus coded gaps
    assert _identical(pack.unpack(packed.data), model)


@pytest.mark.parametrize("spec", ["codebook(bits=3)", "codebook(unit=kernel,kernels=4)", "quant(bits=8)",
                                  "quant(bits=4)", "quant(bits=4,int4=onnx)"])
def test_compressed_models_round_trip_and_shrink(spec):
    model = graphs.concat()
    out, _ = graphs.apply(model, spec)
    packed = pack.pack(out)
    assert _identical(pack.unpack(packed.data), out)
    assert pack.size_report(out, packed)["packed_weights"] < pack.size_report(model)["packed_weights"]
    if "int4" in spec:
        int4 = {t.name for t in out.graph.initializer if t.data_type == TensorProto.INT4 and len(t.raw_data) >= 16}
        assert int4 and int4 <= {r.name for r in packed.records}  # 4-bit tensors are records, not skeleton


def test_damaged_containers_are_refused():
    model = graphs.flatten_gemm()
    data = pack.pack(model).data
    with pytest.raises(pack.PackError, match="bad magic"):
        pack.unpack(b"not a container")
    with pytest.raises(pack.PackError):
        pack.unpack(data[:-10])
    with pytest.raises(pack.PackError):
        pack.unpack(data + b"\0")


# ---------------------------------------------------------------------------------------------- size figures

def test_float_model_costs_32_bits_per_param():
    model = graphs.flatten_gemm()
    report = pack.size_report(model)
    assert set(report) == {"packed", "packed_weights", "bits_per_param"}
    assert report["packed"] == len(pack.pack(model).data)
    assert set(report["bits_per_param"]["layers"]) == {"conv", "y"}
    assert report["bits_per_param"]["layers"]["y"] == pytest.approx(32, abs=0.1)
    assert 32 <= report["bits_per_param"]["overall"] < 33


def test_bits_per_param_follow_the_rebuild_to_its_storage():
    """A DequantizeLinear weight: the layer's bits are those of its int8 tensor and scales, per weight."""
    rng = np.random.default_rng(0)
    q = rng.integers(-3, 4, (64, 128)).astype(np.int8)  # 7 levels: Huffman codes them in < 3 bits
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0),
             helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.ones(64, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    report = pack.size_report(model)
    bits = report["bits_per_param"]["layers"]["Gemm_1"]
    assert 2.0 < bits < 3.2   # entropy of 7 uniform levels is 2.81 bits; + 64 float scales
    assert _identical(pack.unpack(pack.pack(model).data), model)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_pack_unpack_round_trip(tmp_path, capsys):
    model = graphs.concat()
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString(deterministic=True))
    assert main(["pack", str(src), "-o", str(tmp_path / "m.sqz")]) == 0
    assert "bits/param" in capsys.readouterr().out
    assert main(["unpack", str(tmp_path / "m.sqz"), "-o", str(tmp_path / "back.onnx")]) == 0
    assert (tmp_path / "back.onnx").read_bytes() == src.read_bytes()
    # existing outputs are not overwritten without --force; the input is never the output
    assert main(["unpack", str(tmp_path / "m.sqz"), "-o", str(tmp_path / "back.onnx")]) == 2
    assert main(["unpack", str(tmp_path / "m.sqz"), "-o", str(src), "--force"]) == 0
    assert src.read_bytes() == (tmp_path / "back.onnx").read_bytes()
    assert main(["pack", str(src), "-o", str(src), "--force"]) == 2
    assert main(["unpack", str(src), "-o", str(tmp_path / "x.onnx")]) == 2  # not a container
    assert "bad magic" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- corpus

CORPUS_MODELS = ["mnist_burn", "mnist_ortjava", "mnist8_zoo", "cifar10_resnet2b", "cifar10_resnet4b", "sri_resnet_a",
                 "oval21_cifar_base", "oval21_cifar_wide", "oval21_cifar_deep", "marabou_cifar10_small",
                 "marabou_cifar10_medium", "marabou_cifar10_large", "cifar10_winml_tutorial", "squeezenet",
                 "squeezenet_fp16", "ultraface"]


@pytest.mark.corpus
@pytest.mark.parametrize("name", CORPUS_MODELS)
def test_corpus_models_round_trip(corpus, name):
    model = onnx.load(str(corpus.model_path(name)))
    packed = pack.pack(model)  # pack() itself proves the round trip; check it independently too
    assert _identical(pack.unpack(packed.data), model)
    assert len(packed.data) < model.ByteSize() * 1.01
