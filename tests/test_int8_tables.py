"""Lookup tables for elementwise chains on quantized tensors (targets/schedules/int8_tables.py): which chains
become one gather, and that the build computes the same values with and without them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphs

pytestmark = pytest.mark.tvm

XS, XZ = graphs.QDQ_XS, graphs.QDQ_XZ


class _Chain:
    """An int8 conv, then elementwise ops with a QuantizeLinear → DequantizeLinear after each (as `quant` and
    ONNX Runtime's quantize_static write them)."""

    def __init__(self, seed: int = 0, signed: bool = False, channels: int = 8):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.int8 if signed else np.uint8
        self.k = channels
        wq, ws = graphs.qdq_weights(self.rng, (channels, 6, 3, 3), channels)
        self.inits = [nh.from_array(np.array(XS), "xs"), nh.from_array(np.array(XZ), "xz"),
                      nh.from_array(wq, "w"), nh.from_array(ws, "ws")]
        self.nodes = [oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                      oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                      oh.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
                      oh.make_node("Conv", ["xd", "wd"], ["c"], pads=[1] * 4, kernel_shape=[3, 3])]
        self.count = 0
        self.last = self.qdq("c", 0.05)

    def qdq(self, tensor: str, scale: float) -> str:
        """Q → DQ of `tensor` at `scale` (zero point in the middle of the range for uint8, 0 for int8)."""
        i = self.count = self.count + 1
        zero = 0 if self.dtype == np.int8 else 100
        self.inits += [nh.from_array(np.array(scale, np.float32), f"s{i}"),
                       nh.from_array(np.array(zero, self.dtype), f"z{i}")]
        self.nodes += [oh.make_node("QuantizeLinear", [tensor, f"s{i}", f"z{i}"], [f"q{i}"]),
                       oh.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"])]
        return f"d{i}"

    def branch(self) -> str:
        """A second int8 conv of the same input, quantized on its own (a residual's other operand)."""
        wq, ws = graphs.qdq_weights(self.rng, (self.k, 6, 3, 3), self.k)
        self.inits += [nh.from_array(wq, "w_b"), nh.from_array(ws, "ws_b")]
        self.nodes += [oh.make_node("DequantizeLinear", ["w_b", "ws_b"], ["wd_b"], axis=0),
                       oh.make_node("Conv", ["xd", "wd_b"], ["c_b"], pads=[1] * 4, kernel_shape=[3, 3])]
        return self.qdq("c_b", 0.05)

    def const(self, value, name: str) -> str:
        self.inits.append(nh.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op: str, inputs: list[str], scale: float) -> str:
        i = self.count + 1
        self.nodes.append(oh.make_node(op, inputs, [f"o{i}"]))
        return self.qdq(f"o{i}", scale)

    def gelu(self) -> "_Chain":
        """x·½·(1 + erf(x/√2)) as exporters decompose it, each step quantized (ppocrv6_tiny_det's blocks)."""
        x = self.last
        e = self.op("Erf", [self.op("Div", [x, self.const(np.sqrt(2.0), "sqrt2")], 0.03)], 1 / 127)
        a = self.op("Add", [e, self.const(1.0, "one")], 2 / 255)
        m = self.op("Mul", [x, a], 0.06)
        self.last = self.op("Mul", [m, self.const(0.5, "half")], 0.03)
        return self

    def model(self, hw: tuple[int, int] = (9, 11)) -> onnx.ModelProto:
        graph = oh.make_graph(self.nodes, "chain", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 6, *hw])],
                              [oh.make_tensor_value_info(self.last, TP.FLOAT, None)], self.inits)
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
        model.ir_version = 8
        return model


def _target():
    import tvm

    from squeeze.targets import tvm_build
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})


def _rewritten(model: onnx.ModelProto):
    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import int8
    mod = tvm_build.import_onnx(model, {"x": (1, 6, 9, 11)})
    with _target():
        return int8.rewrite_qdq(mod, form=int8.relax_form)


def _ops(mod) -> list[str]:
    from tvm import relax
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e.op.name) if isinstance(
        e, relax.Call) and hasattr(e.op, "name") else None)
    return found


def _outputs(model: onnx.ModelProto, x: np.ndarray, tables: bool, monkeypatch) -> np.ndarray:
    import tvm

    from squeeze.targets import tvm_build
    from squeeze.targets.schedules import build_pipeline, int8
    with monkeypatch.context() as patch:
        if not tables:
            patch.setattr(int8, "lookup_tables", lambda func: func)
        target = _target()
        mod = tvm_build.import_onnx(model, {"x": x.shape})
        executable = tvm_build.compile_module(mod, target, build_pipeline(target, threads=1))
    return tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})[0]


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=2.0, size=(1, 6, 9, 11)).astype(np.float32)


@pytest.mark.parametrize("signed", [False, True])
def test_a_quantized_gelu_becomes_one_gather_with_onnxruntimes_values(signed, monkeypatch):
    """The whole GELU (erf, three arithmetic ops, four quantize/dequantize pairs) after an int8 conv becomes one
    take from a table of 256 values that ONNX Runtime computed: the built model's outputs are identical to ONNX
    Runtime's, and within one quantization step of the build without tables (whose float arithmetic may fuse a
    multiply-add where ONNX Runtime rounds twice)."""
    model = _Chain(signed=signed).gelu().model()
    ops = _ops(_rewritten(model))
    assert ops.count("relax.take") == 1 and "relax.erf" not in ops and "relax.divide" not in ops
    if not signed:  # the uint8 conv is an int8 layer: the lookup runs in its epilogue, not as a pass of its own
        from squeeze.targets import schedules, tvm_build
        fused = schedules.fused_module(tvm_build.import_onnx(model, {"x": (1, 6, 9, 11)}), _target())
        names = [gv.name_hint for gv, _ in fused.functions_items()]
        assert any("conv2d_int8" in n and "lookup" in n for n in names), names
    x = _x()
    with_tables, without = _outputs(model, x, True, monkeypatch), _outputs(model, x, False, monkeypatch)
    np.testing.assert_array_equal(with_tables, _ort(model, x))
    assert np.abs(with_tables - without).max() <= 0.03 * 1.001


def test_a_float_result_gets_a_float_table():
    """A chain that ends in float (the probability map of a detector: dequantize → add a bias → sigmoid, the
    model's output) reads a float32 table: the output equals ONNX Runtime's."""
    chain = _Chain(seed=2)
    chain.nodes.append(oh.make_node("Add", [chain.last, chain.const(0.25, "bias")], ["shifted"]))
    chain.nodes.append(oh.make_node("Sigmoid", ["shifted"], ["prob"]))
    chain.last = "prob"
    model = chain.model()
    ops = _ops(_rewritten(model))
    assert ops.count("relax.take") == 1 and "relax.sigmoid" not in ops
    x = _x(3)
    with pytest.MonkeyPatch.context() as patch:
        out = _outputs(model, x, True, patch)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, _ort(model, x))


def test_what_is_not_a_function_of_one_tensor_is_left_alone():
    """Left as they are: an add of two different int8 tensors (a residual), a multiply by a per-channel constant,
    and a chain too cheap to beat a gather (a dequantize and a relu)."""
    residual = _Chain(seed=4)
    a = residual.last
    b = residual.branch()
    residual.last = residual.op("Add", [residual.op("Erf", [a], 1 / 127), b], 0.05)
    ops = _ops(_rewritten(residual.model()))
    assert ops.count("relax.take") == 1           # the erf alone (a function of the first conv's output) ...
    assert "relax.add" in ops                     # ... but not the add of the two convs' outputs

    channel = _Chain(seed=6)
    channel.last = channel.op("Mul", [channel.op("Erf", [channel.last], 1 / 127),
                                      channel.const(np.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1), "per_channel")],
                              0.02)
    ops = _ops(_rewritten(channel.model()))
    assert "relax.multiply" in ops and ops.count("relax.take") == 1   # the erf part only

    cheap = _Chain(seed=7)
    cheap.nodes.append(oh.make_node("Relu", [cheap.last], ["relu"]))
    cheap.last = "relu"
    assert "relax.take" not in _ops(_rewritten(cheap.model()))


def _vbmi() -> bool:
    from squeeze.targets.schedules.int8_tables import _has_vbmi
    return _has_vbmi(_target())


def _table_gather(dtype: str, lanes: int):
    """A built kernel out[v] = table[index[v]] over a 256-entry `dtype` table, vectorized `lanes` wide (a gather),
    lowered with squeeze's TIR pipeline, and its assembly."""
    import tvm
    from tvm.script import tirx as T

    from squeeze.targets.schedules.pipeline import register_tir_pipeline
    n = 256 * lanes

    @T.prim_func(s_tir=True)
    def gather(table: T.Buffer((256,), dtype), index: T.Buffer((n,), "int32"), out: T.Buffer((n,), dtype)):
        for i in range(n // lanes):
            for j in T.vectorized(lanes):
                with T.sblock("lookup"):
                    v = T.axis.spatial(n, i * lanes + j)
                    out[v] = table[index[v]]

    lib = tvm.compile(tvm.IRModule({"main": gather.with_attr("global_symbol", "main")}), target=_target(),
                      tir_pipeline=register_tir_pipeline())
    return lib, lib.inspect_source("asm") if hasattr(lib, "inspect_source") else lib.mod.inspect_source("asm")


def _reads_every_entry(lib, table: np.ndarray, lanes: int) -> None:
    import tvm
    index = np.random.default_rng(lanes).permutation(np.repeat(np.arange(256, dtype=np.int32), lanes))
    out = tvm.runtime.tensor(np.zeros(index.size, table.dtype))
    lib["main"](tvm.runtime.tensor(table), tvm.runtime.tensor(index), out)
    np.testing.assert_array_equal(out.numpy(), table[index])


@pytest.mark.parametrize("dtype,lanes", [("uint8", 16), ("int8", 16), ("uint8", 20), ("uint8", 64), ("uint8", 4)])
def test_vector_lookups_read_every_entry_as_the_gather_does(dtype, lanes):
    """A vectorized load from a 256-entry byte table at a vector index (a gather) computed by byte permutes
    (`vector_lookups`: vpermi2b over each half, the half picked by the index's top bit) reads the same entries for
    every index 0-255 and any lane count up to 64; the built code holds the permutes and not one byte insert."""
    if not _vbmi():
        pytest.skip("the host has no AVX-512 VBMI")
    lib, asm = _table_gather(dtype, lanes)
    assert "vpermi2b" in asm or "vpermt2b" in asm
    assert "vpinsrb" not in asm
    rng = np.random.default_rng(lanes)
    _reads_every_entry(lib, rng.integers(-128 if dtype == "int8" else 0, 128 if dtype == "int8" else 256, 256)
                       .astype(dtype), lanes)


@pytest.mark.parametrize("dtype,lanes", [("float32", 16), ("float32", 8), ("int32", 16), ("float32", 32)])
def test_word_lookups_are_one_gather_instruction(dtype, lanes):
    """A vectorized load of 8 or 16 float32/int32 lanes at a vector index (a float table's lookup) is one AVX-512
    gather (`vector_lookups(avx512=True)`; 32 lanes: two), not a scalar load and insert per lane, and reads the
    same entries."""
    from squeeze.targets.schedules.int8_tables import _has_avx512
    if not _has_avx512(_target()):
        pytest.skip("the host has no AVX-512")
    lib, asm = _table_gather(dtype, lanes)
    assert ("vgatherdps" if dtype == "float32" else "vpgatherdd") in asm
    assert "vinsertps" not in asm and "vpinsrd" not in asm
    _reads_every_entry(lib, (np.random.default_rng(lanes).standard_normal(256) * 100).astype(dtype), lanes)


def test_a_gelu_epilogue_looks_up_with_permutes():
    """The int8 conv's GELU table is read with byte permutes on a VBMI host (no byte-by-byte gather), in the column
    form's epilogue (32 columns) and the channel form's (11), with ONNX Runtime's values."""
    import tvm

    from squeeze.targets import schedules, tvm_build
    if not _vbmi():
        pytest.skip("the host has no AVX-512 VBMI")
    for hw, k in (((6, 32), 8), ((9, 11), 16)):
        chain = _Chain(channels=k).gelu()
        chain.last = f"q{chain.count}"  # the quantized GELU is the output: a uint8 table (a float one is not permuted)
        model = chain.model(hw)
        model.graph.output[0].type.tensor_type.elem_type = TP.UINT8
        target = _target()
        executable = tvm_build.compile_module(tvm_build.import_onnx(model, {"x": (1, 6, *hw)}), target,
                                              schedules.build_pipeline(target, threads=1))
        asm = next(m for m in executable.mod.imports if m.kind == "llvm").inspect_source("asm")
        assert "vpermi2b" in asm or "vpermt2b" in asm, hw
        x = np.random.default_rng(4).normal(scale=2.0, size=(1, 6, *hw)).astype(np.float32)
        got = tvm_build.VMRunner(executable, tvm.cpu(), ["x"]).run({"x": x})[0]
        np.testing.assert_array_equal(got, _ort(model, x))


def test_a_requantize_is_a_table_where_tables_are_permuted(monkeypatch):
    """dequantize → quantize at another scale (an int8 layer's output requantized to its concat's scale) costs
    `MIN_COST_PERMUTED`: a table on a VBMI host, where byte lookups are permutes; arithmetic otherwise. Same values
    as ONNX Runtime either way."""
    from squeeze.targets.schedules import int8_tables
    chain = _Chain(seed=5)
    chain.qdq(chain.last, 0.07)
    chain.last = f"q{chain.count}"  # the requantized bytes are the output (as the concat after such a layer reads)
    model = chain.model()
    model.graph.output[0].type.tensor_type.elem_type = TP.UINT8
    for permuted in (True, False):
        monkeypatch.setattr(int8_tables, "_has_vbmi", lambda target, permuted=permuted: permuted)
        assert _ops(_rewritten(model)).count("relax.take") == int(permuted)
    monkeypatch.undo()
    x = _x(6)
    np.testing.assert_array_equal(_outputs(model, x, True, monkeypatch), _ort(model, x))
