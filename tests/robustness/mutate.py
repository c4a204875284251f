"""A seeded generator of hostile inputs: `case(seed, index)` is the same `Case` on every machine and every run.

A case is a small folder (the model, maybe external data, links, a calibration .npz) plus the arguments squeeze
gets. Families, picked at random per index:

* `edge`    — one of `models.EDGE_CASES` as it is (the first indices of a run go through all of them in order);
* `bytes`   — a serialized model truncated, bit-flipped, spliced, doubled, or with another format's magic;
* `struct`  — a valid model with 1–3 structural mutations (cycles, dangling and duplicate names, opset and IR
              versions, unknown domains, fp16/bf16/int/NaN/zero-size weights, symbolic dims, If wrappers, ...);
* `extdata` — a weight moved to external data at a benign or hostile location (`../`, absolute, symlink,
              hardlink, FIFO, directory, bad offsets);
* `data`    — a valid model with a broken or unusual calibration .npz;
* `spec`    — valid and invalid `--passes` / `--input-shape` strings.

Mutations that could exhaust memory or run forever (huge shapes, billion-step loops) are left out: the suite
must be safe to run beside other people's work.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphs
from robustness import models

FLOAT = TensorProto.FLOAT


@dataclass
class Case:
    name: str
    files: dict[str, bytes] = field(default_factory=dict)   # relative path -> content; the model is model.onnx
    links: list[tuple[str, str, str]] = field(default_factory=list)  # (symlink|hardlink|fifo|dir, path, target)
    passes: str = "cleanup"
    input_shapes: list[str] = field(default_factory=list)
    calib: str | None = None           # relative path of a calibration .npz in `files`
    expect: str = "either"             # ok (a Result must come back) | error (a SqueezeError) | either
    seed: int = 0
    steps: list[str] = field(default_factory=list)  # what was done, for the reproducer

    def describe(self) -> str:
        extra = f" shapes={self.input_shapes}" if self.input_shapes else ""
        extra += f" calib={self.calib}" if self.calib else ""
        return f"{self.name} [{'; '.join(self.steps)}] passes={self.passes!r}{extra} expect={self.expect}"


# ------------------------------------------------------------------------------------------------- bases

def _valid_edge_names() -> list[str]:
    return [n for n, (_, expect) in models.EDGE_CASES.items() if expect == "ok"]


def _corpus_models() -> list[str]:
    """Small corpus models (< 2 MB, a second or less per pass) when ../shared/corpus is present."""
    try:
        from benchmarks import corpus  # noqa: PLC0415
    except ImportError:
        return []
    if not corpus.available():
        return []
    names = ["mnist8_zoo", "mnist_ortjava", "cifar10_winml_tutorial", "oval21_cifar_deep", "cifar10_resnet2b",
             "mnist_burn"]
    return [n for n in names if corpus.model_path(n).is_file()]


def base_model(rng: np.random.Generator, corpus_share: float = 0.1) -> tuple[str, onnx.ModelProto]:
    corpus_names = _corpus_models()
    if corpus_names and rng.random() < corpus_share:
        from benchmarks import corpus  # noqa: PLC0415
        name = corpus_names[rng.integers(len(corpus_names))]
        return f"corpus:{name}", onnx.load(str(corpus.model_path(name)))
    pool = [("tiny:" + n, fn) for n, fn in graphs.LOSSLESS.items()] + \
           [("edge:" + n, models.EDGE_CASES[n][0]) for n in _valid_edge_names()]
    name, fn = pool[rng.integers(len(pool))]
    return name, fn()


def random_passes(rng: np.random.Generator) -> str:
    from squeeze.registry import all_passes  # noqa: PLC0415
    names = sorted(all_passes())
    count = int(rng.choice([0, 1, 1, 1, 2, 2, 3]))
    return ",".join(str(names[i]) for i in rng.integers(0, len(names), count))


# ------------------------------------------------------------------------------------------------- bytes

MAGICS = [b"PK\x03\x04", b"\x1f\x8b\x08\x00", b"\x89PNG\r\n\x1a\n", b"\x7fELF\x02\x01\x01", b"\x93NUMPY\x01\x00",
          b"\x80\x04\x95", b"\x18\x00\x00\x00TFL3", b"\x89HDF\r\n\x1a\n", b"{\"format\": \"onnx\"}", b"\xef\xbb\xbf",
          b"\x00\x00\x00\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"]


def mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    n = len(data)
    kind = rng.choice(["truncate", "bitflip", "overwrite", "insert", "delete", "magic", "foreign", "double",
                       "bitflip_header"])
    if kind == "truncate":
        k = int(rng.integers(0, max(n, 1)))
        return data[:k], f"truncate to {k}/{n} bytes"
    if kind in ("bitflip", "bitflip_header"):
        buf = bytearray(data)
        flips = int(rng.integers(1, 9))
        span = min(n, 64) if kind == "bitflip_header" else n
        for _ in range(flips):
            pos = int(rng.integers(0, max(span, 1)))
            if buf:
                buf[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(buf), f"{kind} x{flips}"
    if kind == "overwrite":
        pos, size = int(rng.integers(0, max(n, 1))), int(rng.integers(1, 64))
        return data[:pos] + rng.bytes(size) + data[pos + size:], f"overwrite {size} bytes at {pos}"
    if kind == "insert":
        pos, size = int(rng.integers(0, max(n, 1))), int(rng.integers(1, 64))
        return data[:pos] + rng.bytes(size) + data[pos:], f"insert {size} bytes at {pos}"
    if kind == "delete":
        pos, size = int(rng.integers(0, max(n, 1))), int(rng.integers(1, 64))
        return data[:pos] + data[pos + size:], f"delete {size} bytes at {pos}"
    if kind == "magic":
        magic = MAGICS[rng.integers(len(MAGICS))]
        if rng.random() < 0.5:
            return magic + data, f"prepend magic {magic[:8]!r}"
        return magic + data[len(magic):], f"replace start with magic {magic[:8]!r}"
    if kind == "foreign":
        choice = int(rng.integers(0, 6))
        foreign = [b"", b"\x00" * 1024, rng.bytes(int(rng.integers(1, 4096))), _npz_bytes({"x": np.zeros(3)}),
                   b'ir_version: 8\ngraph { name: "g" }\n', b"<html><body>404 Not Found</body></html>\n"][choice]
        return foreign, f"foreign content #{choice} ({len(foreign)} bytes)"
    return data + data, "serialized twice (protobuf merges: every repeated field doubled)"


def _npz_bytes(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- structure

HOSTILE_NAMES = ["../../escape", "/etc/passwd", "a/b/c", "..", ".", "", " ", "x" * 2000, "名前", "a\nb", "a\x00b",
                 "C:\\evil", "$(touch pwned)", "%2e%2e%2f", "model.onnx", "model.onnx.data", ".squeeze.lock"]


def _tensor_names(model: onnx.ModelProto) -> list[str]:
    names = [i.name for i in model.graph.input] + [t.name for t in model.graph.initializer]
    for node in model.graph.node:
        names += [o for o in node.output if o]
    return names


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))] if len(seq) else None


def _float_inits(model):
    return [t for t in model.graph.initializer if t.data_type == FLOAT and t.HasField("raw_data") or
            (t.data_type == FLOAT and len(t.float_data))]


def m_drop_node(m, rng):
    if m.graph.node:
        i = int(rng.integers(len(m.graph.node)))
        node = m.graph.node[i]
        del m.graph.node[i]
        return f"drop node {node.op_type} {node.name!r}"


def m_duplicate_node(m, rng):
    node = _pick(rng, m.graph.node)
    if node is not None:
        m.graph.node.append(node)
        return f"duplicate node {node.name!r}"


def m_rewire(m, rng):
    node, name = _pick(rng, m.graph.node), _pick(rng, _tensor_names(m))
    if node is not None and node.input and name is not None:
        k = int(rng.integers(len(node.input)))
        node.input[k] = name
        return f"rewire {node.name!r} input {k} to {name[:40]!r}"


def m_dangling(m, rng):
    node = _pick(rng, m.graph.node)
    if node is not None and node.input:
        node.input[int(rng.integers(len(node.input)))] = "ghost"
        return f"dangling input on {node.name!r}"


def m_cycle(m, rng):
    if len(m.graph.node) >= 2:
        first, last = m.graph.node[0], m.graph.node[len(m.graph.node) - 1]
        if first.input and last.output:
            first.input[0] = last.output[0]
            return "cycle: first node reads the last node's output"


def m_shuffle(m, rng):
    nodes = list(m.graph.node)
    order = rng.permutation(len(nodes))
    del m.graph.node[:]
    m.graph.node.extend(nodes[i] for i in order)
    return "nodes shuffled (not topologically sorted)"


def m_rename_tensor(m, rng):
    old, new = _pick(rng, _tensor_names(m)), _pick(rng, HOSTILE_NAMES)
    if old is None or new is None:
        return None
    models._rename(m.graph, {old: new})
    for node in m.graph.node:  # subgraphs that read it from the outer scope
        for g in _subgraphs(node):
            models._rename(g, {old: new})
    return f"rename tensor {old[:30]!r} -> {new[:30]!r}"


def m_rename_nodes(m, rng):
    how = rng.choice(["same", "empty", "hostile"])
    for node in m.graph.node:
        node.name = {"same": "n", "empty": "", "hostile": str(_pick(rng, HOSTILE_NAMES))}[how]
    return f"node names: {how}"


def m_opset(m, rng):
    v = int(rng.integers(1, models.NEWEST_OPSET + 4))
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = v
    return f"default opset -> {v}"


def m_ir(m, rng):
    m.ir_version = int(rng.integers(0, onnx.IR_VERSION + 3))
    return f"ir_version -> {m.ir_version}"


def m_drop_opset_import(m, rng):
    del m.opset_import[:]
    return "no opset_import"


def m_unknown_domain(m, rng):
    node = _pick(rng, m.graph.node)
    if node is None:
        return None
    domain = str(rng.choice(["com.example", "ai.onnx.ml", "com.microsoft", "org.pytorch.aten", "bogus"]))
    node.domain = domain
    if rng.random() < 0.7:
        m.opset_import.append(helper.make_opsetid(domain, 1))
    return f"node {node.name!r} moved to domain {domain}"


OPS = ["Relu", "Sigmoid", "Tanh", "Identity", "Abs", "Neg", "Softmax", "Conv", "Gemm", "Frob", "If", "Loop", "",
       "BatchNormalization", "Dropout", "QuantizeLinear", "Reshape", "Add", "Concat"]


def m_op_type(m, rng):
    node = _pick(rng, m.graph.node)
    if node is not None:
        old, node.op_type = node.op_type, str(_pick(rng, OPS))
        return f"op {old} -> {node.op_type!r} on {node.name!r}"


def m_attribute(m, rng):
    node = _pick(rng, [n for n in m.graph.node if n.attribute])
    if node is None:
        return None
    attr = node.attribute[int(rng.integers(len(node.attribute)))]
    how = rng.choice(["drop", "perturb", "retype"])
    if how == "drop":
        node.attribute.remove(attr)
    elif how == "retype":
        attr.type = int(rng.integers(0, 15))
    elif attr.type == onnx.AttributeProto.INT:
        attr.i = int(rng.choice([0, -1, 2, 3, 7]))
    elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
        attr.ints[int(rng.integers(len(attr.ints)))] = int(rng.choice([0, -1, 2, 5]))
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = float(rng.choice([0.0, -1.0, np.nan, np.inf, 1e30]))
    else:
        node.attribute.append(helper.make_attribute("frobnicate", 1))
    return f"attribute {attr.name} of {node.name!r}: {how}"


def m_cast_weights(m, rng):
    to = int(rng.choice([TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE]))
    if m.ir_version < 4:
        return None  # Cast-before-use would leave initializers listed as inputs under new names
    try:
        models._cast_weights(m, to)
    except Exception:  # the model was already broken by an earlier mutation: the checker says so, keep going
        pass
    return f"weights stored as {TensorProto.DataType.Name(to)} with Cast"


def m_retype_weight(m, rng):
    t = _pick(rng, _float_inits(m))
    if t is None:
        return None
    to = int(rng.choice([TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT64, TensorProto.DOUBLE,
                         TensorProto.UINT8]))
    arr = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(arr.astype(helper.tensor_dtype_to_np_dtype(to)), t.name))
    return f"weight {t.name!r} stored as {TensorProto.DataType.Name(to)} without Cast"


def m_nan_inf(m, rng):
    t = _pick(rng, _float_inits(m))
    if t is None:
        return None
    arr = numpy_helper.to_array(t).copy()
    if arr.size:
        value = float(rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e-45]))
        idx = rng.integers(0, arr.size, max(1, arr.size // int(rng.choice([1, 10, 100, 10000]))))
        arr.flat[idx] = value
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        return f"{len(idx)} value(s) of {t.name!r} set to {value}"


def m_zero_size(m, rng):
    if rng.random() < 0.5:
        m.graph.initializer.append(numpy_helper.from_array(np.zeros((0, 4), np.float32), "unused_empty"))
        return "unused zero-size initializer"
    t = _pick(rng, _float_inits(m))
    if t is None:
        return None
    shape = list(t.dims) or [1]
    shape[int(rng.integers(len(shape)))] = 0
    t.CopyFrom(numpy_helper.from_array(np.zeros(shape, np.float32), t.name))
    return f"weight {t.name!r} made zero-size {shape}"


def m_input_dims(m, rng):
    inits = {t.name for t in m.graph.initializer}
    real = [i for i in m.graph.input if i.name not in inits and i.type.HasField("tensor_type")]
    value = _pick(rng, real)
    if value is None:
        return None
    how = rng.choice(["symbolic", "symbolic_batch", "unknown", "zero", "negative", "no_shape", "elem_type"])
    dims = value.type.tensor_type.shape.dim
    if how == "no_shape":
        value.type.tensor_type.ClearField("shape")
    elif how == "elem_type":
        value.type.tensor_type.elem_type = int(rng.choice([0, 2, 3, 6, 7, 8, 9, 10, 11, 16, 999]))
    elif len(dims):
        k = 0 if how == "symbolic_batch" else int(rng.integers(len(dims)))
        if how in ("symbolic", "symbolic_batch"):
            dims[k].dim_param = "N" if k == 0 else f"d{k}"
        elif how == "unknown":
            dims[k].Clear()
        else:
            dims[k].dim_value = 0 if how == "zero" else -3
    return f"input {value.name!r}: {how}"


def m_outputs(m, rng):
    how = rng.choice(["clear", "ghost", "input", "duplicate", "initializer", "intermediate"])
    out = m.graph.output
    if how == "clear":
        del out[:]
    elif how == "ghost":
        out.append(helper.make_tensor_value_info("ghost_out", FLOAT, [1]))
    elif how == "input" and len(m.graph.input):
        out.append(m.graph.input[0])
    elif how == "duplicate" and len(out):
        out.append(out[0])
    elif how == "initializer" and len(m.graph.initializer):
        t = m.graph.initializer[0]
        out.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    elif how == "intermediate" and len(m.graph.node) > 1:
        name = m.graph.node[0].output[0]
        out.append(helper.make_tensor_value_info(name, FLOAT, None))
    return f"outputs: {how}"


def m_inits_as_inputs(m, rng):
    names = {i.name for i in m.graph.input}
    if rng.random() < 0.8:
        for t in m.graph.initializer:
            if t.name not in names:
                m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        return "initializers listed as inputs"
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return "initializers removed from the inputs"


def m_wrap_in_if(m, rng):
    """Move the whole body into both branches of an If on a data-dependent condition: control flow."""
    inits = {t.name for t in m.graph.initializer}
    real = [i for i in m.graph.input if i.name not in inits and i.type.tensor_type.elem_type == FLOAT]
    if not real or len(m.graph.output) != 1 or not m.graph.node:
        return None
    out = m.graph.output[0]
    branches = []
    for prefix in ("then", "else"):
        renames = {o: f"{prefix}/{o}" for n in m.graph.node for o in n.output if o}
        nodes = []
        for n in m.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{prefix}/{n.name}"
            c.input[:] = [renames.get(i, i) for i in c.input]
            c.output[:] = [renames.get(o, o) for o in c.output]
            nodes.append(c)
        branch_out = onnx.ValueInfoProto()
        branch_out.CopyFrom(out)
        branch_out.name = renames.get(out.name, out.name)
        branches.append(helper.make_graph(nodes, prefix, [], [branch_out]))
    if branches[0].output[0].name == out.name:  # the output is an input or initializer: nothing to wrap
        return None
    m.graph.initializer.append(numpy_helper.from_array(np.float32(0), "wrap_zero"))
    pre = [helper.make_node("ReduceSum", [real[0].name], ["wrap_sum"], name="wrap_sum", keepdims=0),
           helper.make_node("Greater", ["wrap_sum", "wrap_zero"], ["wrap_cond"], name="wrap_cond"),
           helper.make_node("If", ["wrap_cond"], [out.name], name="wrap_if",
                            then_branch=branches[0], else_branch=branches[1])]
    del m.graph.node[:]
    m.graph.node.extend(pre)
    if m.ir_version < 4:
        m.graph.input.append(helper.make_tensor_value_info("wrap_zero", FLOAT, []))
    return "whole graph wrapped in both branches of an If"


def m_value_info(m, rng):
    names = [o for n in m.graph.node for o in n.output if o]
    name = _pick(rng, names)
    if name is not None:
        m.graph.value_info.append(helper.make_tensor_value_info(
            name, int(rng.choice([FLOAT, TensorProto.INT64, TensorProto.FLOAT16])), [int(rng.integers(1, 9))] * 3))
        return f"wrong value_info for {name[:30]!r}"


def m_raw_data(m, rng):
    t = _pick(rng, [t for t in m.graph.initializer if t.HasField("raw_data") and len(t.raw_data) > 1])
    if t is None:
        return None
    how = rng.choice(["short", "long", "dims"])
    if how == "short":
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    elif how == "long":
        t.raw_data = t.raw_data + b"\0" * 8
    else:
        t.dims.append(3)
    return f"initializer {t.name!r}: {how} raw data"


def m_sparse(m, rng):
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "sparse_w")
    indices = numpy_helper.from_array(np.array([0, int(rng.choice([3, 99]))], np.int64), "sparse_w_idx")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    return "sparse initializer added"


def m_metadata(m, rng):
    m.doc_string = rng.bytes(64).decode("latin-1")
    onnx.helper.set_model_props(m, {"k" * 100: "v" * 10000, "author": "\x00\x01"})
    m.producer_name = "../" * 10
    return "hostile metadata and doc strings"


def m_optional_io(m, rng):
    node = _pick(rng, m.graph.node)
    if node is not None:
        node.input.append("")
        node.output.append("")
        return f"empty optional input/output on {node.name!r}"


def m_training_info(m, rng):
    m.training_info.add().algorithm.CopyFrom(helper.make_graph([], "train", [], []))
    return "training_info added"


def _subgraphs(node):
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + \
           [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


STRUCT_MUTATIONS: list[Callable] = [
    m_drop_node, m_duplicate_node, m_rewire, m_dangling, m_cycle, m_shuffle, m_rename_tensor, m_rename_nodes,
    m_opset, m_ir, m_drop_opset_import, m_unknown_domain, m_op_type, m_attribute, m_cast_weights, m_retype_weight,
    m_nan_inf, m_nan_inf, m_zero_size, m_input_dims, m_input_dims, m_outputs, m_inits_as_inputs, m_wrap_in_if,
    m_wrap_in_if, m_value_info, m_raw_data, m_sparse, m_metadata, m_optional_io, m_training_info,
]


# ------------------------------------------------------------------------------------------------- external data

def _externalize(model: onnx.ModelProto, rng, location: str, offset: str = "0", length: str | None = None,
                 extra: dict[str, str] | None = None) -> tuple[str, bytes] | None:
    big = [t for t in model.graph.initializer if len(t.raw_data) >= 64]
    t = _pick(rng, big)
    if t is None:
        return None
    raw = t.raw_data
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length or str(len(raw))),
                       *(extra or {}).items()):
        t.external_data.add(key=key, value=value)
    return t.name, raw


EXT_KINDS = ["inside", "subdir", "parent", "nested_parent", "absolute", "etc_passwd", "empty", "dot", "nul",
             "symlink_out", "symlink_in", "symlink_dir", "hardlink", "fifo", "directory", "missing", "offset_beyond",
             "offset_negative", "offset_text", "length_long", "self", "dev_zero", "url", "tilde"]


def extdata_case(rng, case: Case, model: onnx.ModelProto) -> str | None:
    kind = str(rng.choice(EXT_KINDS))
    locations = {"inside": "w.bin", "subdir": "sub/w.bin", "parent": "../w.bin", "nested_parent": "sub/../../w.bin",
                 "absolute": "/proc/self/environ", "etc_passwd": "/etc/passwd", "empty": "", "dot": ".",
                 "nul": "w.bin\x00.txt", "symlink_out": "link.bin", "symlink_in": "link.bin", "symlink_dir": "sub/w.bin",
                 "hardlink": "hard.bin", "fifo": "pipe.bin", "directory": "sub", "missing": "absent.bin",
                 "offset_beyond": "w.bin", "offset_negative": "w.bin", "offset_text": "w.bin", "length_long": "w.bin",
                 "self": "model.onnx", "dev_zero": "/dev/zero", "url": "file:///etc/passwd", "tilde": "~/w.bin"}
    offset = {"offset_beyond": "1000000", "offset_negative": "-8", "offset_text": "eight"}.get(kind, "0")
    done = _externalize(model, rng, locations[kind], offset=offset,
                        length=str(10**9) if kind == "length_long" else None)
    if done is None:
        return None
    name, raw = done
    if kind in ("inside", "offset_beyond", "offset_negative", "offset_text", "length_long"):
        case.files["w.bin"] = raw
    elif kind == "subdir":
        case.files["sub/w.bin"] = raw
    elif kind in ("parent", "nested_parent"):
        case.files["../outside/w.bin"] = raw
        case.files["../w.bin"] = raw
    elif kind == "symlink_out":
        case.files["../outside/w.bin"] = raw
        case.links.append(("symlink", "link.bin", "../outside/w.bin"))
    elif kind == "symlink_in":
        case.files["w.bin"] = raw
        case.links.append(("symlink", "link.bin", "w.bin"))
    elif kind == "symlink_dir":
        case.files["../outside/w.bin"] = raw
        case.links.append(("symlink", "sub", "../outside"))
    elif kind == "hardlink":
        case.files["../outside/w.bin"] = raw
        case.links.append(("hardlink", "hard.bin", "../outside/w.bin"))
    elif kind == "fifo":
        case.links.append(("fifo", "pipe.bin", ""))
    elif kind == "directory":
        case.links.append(("dir", "sub", ""))
    case.expect = "ok" if kind in ("inside", "subdir") else "either" if kind == "self" else "error"
    return f"external data for {name!r}: {kind} ({locations[kind]!r}, offset {offset})"


# ------------------------------------------------------------------------------------------------- data

def data_case(rng, case: Case, model: onnx.ModelProto) -> str | None:
    from squeeze.data import input_specs, resolve_shapes  # noqa: PLC0415
    try:
        specs = input_specs(model)
        shapes = resolve_shapes(specs, {})
    except Exception:
        return None
    kind = str(rng.choice(["good", "labels", "not_zip", "npy", "pickled", "bitflip", "wrong_name", "wrong_shape",
                           "strings", "complex", "nan", "empty", "extra", "bad_labels", "unstacked", "int_for_float"]))
    n = int(rng.integers(1, 6))
    arrays = {}
    for s in specs:
        shape = (n,) + tuple(shapes[s.name][1:]) if shapes[s.name] and shapes[s.name][0] == 1 else \
            (n,) + tuple(shapes[s.name])
        arrays[s.name] = rng.standard_normal(shape).astype(s.dtype) if s.dtype.kind == "f" else \
            rng.integers(0, 3, shape).astype(s.dtype)
    first = specs[0].name if specs else "x"
    if kind == "labels":
        arrays["labels"] = rng.integers(0, 10, n)
    elif kind == "wrong_name":
        arrays = {"not_an_input": np.zeros(3), "also_not": np.zeros(3)}
    elif kind == "wrong_shape" and first in arrays:
        arrays[first] = np.zeros((n, 7, 7), np.float32)
    elif kind == "strings":
        arrays[first] = np.array(["a"] * n)
    elif kind == "complex" and first in arrays:
        arrays[first] = arrays[first].astype(np.complex64)
    elif kind == "nan" and first in arrays and arrays[first].dtype.kind == "f":
        arrays[first][...] = np.nan
    elif kind == "empty" and first in arrays:
        arrays[first] = arrays[first][:0]
    elif kind == "extra":
        arrays["extra"] = np.zeros(2)
    elif kind == "bad_labels":
        arrays["labels"] = [np.zeros((n, 2)), np.array(["x"] * n), np.zeros(n + 1, np.int64),
                            np.full(n, -5, np.int64)][int(rng.integers(4))]
    elif kind == "unstacked" and first in arrays:
        arrays[first] = arrays[first][0]
    elif kind == "int_for_float" and first in arrays:
        arrays[first] = np.ones(arrays[first].shape, np.int64)
    if kind == "not_zip":
        blob = rng.bytes(int(rng.integers(0, 300)))
    elif kind == "npy":
        buf = io.BytesIO()
        np.save(buf, next(iter(arrays.values()), np.zeros(3)))
        blob = buf.getvalue()
    elif kind == "pickled":
        buf = io.BytesIO()
        np.savez(buf, **{first: np.array([{"evil": 1}] * n, dtype=object)})
        blob = buf.getvalue()
    elif kind == "bitflip":
        blob = bytearray(_npz_bytes(arrays, compressed=bool(rng.random() < 0.5)))
        for _ in range(int(rng.integers(1, 6))):
            blob[int(rng.integers(len(blob)))] ^= 1 << int(rng.integers(8))
        blob = bytes(blob)
    else:
        blob = _npz_bytes(arrays, compressed=bool(rng.random() < 0.3))
    case.files["calib.npz"] = blob
    case.calib = "calib.npz"
    case.expect = "ok" if kind in ("good", "labels", "int_for_float") else "either"
    return f"calibration data: {kind} ({n} samples)"


# ------------------------------------------------------------------------------------------------- specs

BAD_SPECS = ["nonexistent", "cleanup(", "cleanup)", "prune(ratio=2)", "prune(ratio=-1)", "prune(ratio='x')",
             "quant(bits=3.5)", "cleanup(unknown=1)", ",,,", "cleanup,,fold-bn", "__import__('os')",
             "cleanup(fold_constants=[1,2])", "prune(ratio=1e400)", "prune(ratio=nan)", "a" * 500, "fold-bn(**{})",
             "cleanup; rm -rf /", "prune(ratio=0.5, ratio=0.6)", "codebook(bits=0)", "slim(" + "(" * 200]
SHAPES = ["x=1x3x8x8", "x=2x3x8x8", "1x3x8x8", "x=0x3x8x8", "x=-1x3x8x8", "x=1x3", "x=ax3", "nope=1x3x8x8", "x=",
          "=", "x=1x3x8x8x1", "x=1x3x16x16", "x=1x3x1x1", "x=" + "x".join(["1"] * 40)]


def spec_case(rng, case: Case) -> str:
    if rng.random() < 0.5:
        case.passes = str(_pick(rng, BAD_SPECS))
        case.expect = "either"
        return f"pass spec {case.passes[:40]!r}"
    case.input_shapes = [str(_pick(rng, SHAPES)) for _ in range(int(rng.integers(1, 3)))]
    return f"input shapes {case.input_shapes}"


# ------------------------------------------------------------------------------------------------- the generator

FAMILIES = ["bytes", "bytes", "struct", "struct", "struct", "struct", "extdata", "data", "spec", "edge", "edge"]


def case(seed: int, index: int, corpus_share: float = 0.1) -> Case:
    """The `index`-th case of the run seeded `seed` (indices below len(EDGE_CASES) are the edge cases in order)."""
    rng = np.random.default_rng([seed, index])
    result = Case(name=f"seed{seed}-case{index}", seed=int(rng.integers(0, 2**16)))
    result.passes = random_passes(rng)
    edge_names = list(models.EDGE_CASES)
    if index < len(edge_names):
        name = edge_names[index]
        fn, result.expect = models.EDGE_CASES[name]
        result.steps.append(f"edge case {name}")
        if not result.passes:
            result.passes = "cleanup"
        if name == "symbolic_dims" and rng.random() < 0.5:
            result.input_shapes, result.expect = ["x=1x3x8x8"], "ok"
            result.steps.append("--input-shape x=1x3x8x8")
        result.files["model.onnx"] = fn().SerializeToString()
        return result
    family = str(rng.choice(FAMILIES))
    base_name, model = base_model(rng, corpus_share)
    result.steps.append(f"{family} on {base_name}")
    if family == "edge":
        name = edge_names[int(rng.integers(len(edge_names)))]
        fn, result.expect = models.EDGE_CASES[name]
        result.steps[-1] = f"edge case {name}"
        model = fn()
    elif family == "bytes":
        data, how = mutate_bytes(model.SerializeToString(), rng)
        result.steps.append(how)
        result.files["model.onnx"] = data
        return result
    elif family == "struct":
        for _ in range(int(rng.choice([1, 1, 2, 3]))):
            fn = STRUCT_MUTATIONS[int(rng.integers(len(STRUCT_MUTATIONS)))]
            what = fn(model, rng)
            if what:
                result.steps.append(what)
    elif family == "extdata":
        what = extdata_case(rng, result, model)
        if what:
            result.steps.append(what)
    elif family == "data":
        what = data_case(rng, result, model)
        if what:
            result.steps.append(what)
    elif family == "spec":
        result.steps.append(spec_case(rng, result))
    if family in ("struct", "spec"):
        result.expect = "either"
    elif family == "data" and not result.calib:
        result.expect = "ok"
    elif family == "extdata" and len(result.steps) == 1:
        result.expect = "ok"
    result.files["model.onnx"] = model.SerializeToString()
    return result
