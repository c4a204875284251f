"""Model I/O: load with validation, save atomically, measure file size.

The input model is only ever read. Saving writes to a temporary file in the destination folder and renames it
into place, so a reader never sees a half-written model and an interrupted run leaves the old file intact.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputError, first_line

# Protobuf cannot serialise a message over 2 GiB; stay well below it before switching to external data.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX model (external data included); raise ModelLoadError with a clear reason."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX file (truncated or corrupt protobuf: {first_line(exc)})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found; is this really a .onnx file?)")
    if model.ir_version <= 0 or not model.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model (missing IR version or opset import)")
    if not model.graph.output:
        raise ModelLoadError(f"{path}: the graph has no outputs")
    _check_external_data_locations(model, path.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # onnx reports a missing file as invalid
        raise ModelLoadError(f"{path}: cannot load external data: {first_line(exc)}") from exc
    try:
        if not is_big(model):
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ModelLoadError(f"{path}: fails the ONNX checker: {first_line(exc)}") from exc
    return model


def _check_external_data_locations(model: onnx.ModelProto, base: Path) -> None:
    """Refuse external-data paths that leave the model's folder or go through links (path traversal)."""
    base = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if any(ord(c) < 32 for c in location):
            raise ModelLoadError(f"tensor {tensor.name!r}: external data location {location!r} holds control "
                                 "characters; refusing to read it")
        where = Path(location)
        if not location or where.is_absolute() or ".." in where.parts:
            raise ModelLoadError(f"tensor {tensor.name!r}: external data location {location!r} is outside the model's folder; refusing to read it")
        full = base / where
        if full.is_symlink() or any(p.is_symlink() for p in full.parents if base in p.parents or p == base):
            raise ModelLoadError(f"tensor {tensor.name!r}: external data {location!r} is a symbolic link; refusing to read it")
        if full.exists() and not full.is_file():
            raise ModelLoadError(f"tensor {tensor.name!r}: external data {location!r} is not a regular file; refusing to read it")
        if full.exists() and full.stat().st_nlink > 1:
            raise ModelLoadError(f"tensor {tensor.name!r}: external data {location!r} is a hard link; refusing to read it")
        if not full.resolve().is_relative_to(base):
            raise ModelLoadError(f"tensor {tensor.name!r}: external data {location!r} resolves outside the model's folder")


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write `model` atomically to `path` (plus `path.data` for models over the protobuf limit); return the files."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; refusing to write through it")
    if not is_big(model):
        atomic_write(path, model.SerializeToString(deterministic=True))
        return [path]
    # Large model: the large weights go, one after the other, to one file beside it (never the whole model
    # serialized or copied at once); the model file keeps the rest and points at that file.
    data_path = path.with_name(path.name + ".data")
    if data_path.is_symlink():
        raise OutputError(f"{data_path}: is a symbolic link; refusing to write through it")
    skeleton, weights = without_weights(model)
    stored = {t.name: t for t in skeleton.graph.initializer}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{data_path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            for name, tensor in weights.items():
                offset = f.tell()
                data = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
                f.write(data)
                _point_at(stored[name], data_path.name, offset, len(data))
                del data
                f.write(b"\0" * (-f.tell() % 4096))  # page-aligned tensors: readers may map them
            f.flush()
            os.fsync(f.fileno())
        atomic_write(path, skeleton.SerializeToString(deterministic=True))
        os.replace(tmp, data_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return [path, data_path]


# Initializers larger than this are handled one by one (external data, ONNX Runtime initializers, export) rather
# than inside a serialized model, which protobuf caps at 2 GiB.
_LARGE_TENSOR_BYTES = 1 << 16


def is_big(model: onnx.ModelProto) -> bool:
    """True if the model is too large to serialize as one protobuf (it needs external data).

    Judged from the initializers' shapes and the nodes' sizes: protobuf's own ByteSize walks every byte.
    """
    return _estimated_bytes(model) >= _EXTERNAL_DATA_THRESHOLD


def _estimated_bytes(model: onnx.ModelProto) -> int:
    g = model.graph
    return sum(tensor_nbytes(t) for t in g.initializer) + sum(n.ByteSize() for n in g.node)


def without_weights(model: onnx.ModelProto, as_inputs: bool = False
                    ) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of `model` without the bytes of its large initializers, and those initializers by name.

    Each large initializer keeps its name, type and dims and is marked as external data (`as_inputs=False`: for
    shape inference and ONNX Runtime, which gets the values as external initializers) or becomes a graph input
    (`as_inputs=True`: for the checker, which would look for the external file). The weights are not copied.
    """
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    graph = skeleton.graph
    _copy_fields(model.graph, graph, skip="initializer")
    listed = {i.name for i in model.graph.input}
    weights: dict[str, onnx.TensorProto] = {}
    for tensor in model.graph.initializer:
        if tensor_nbytes(tensor) <= _LARGE_TENSOR_BYTES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
            continue
        weights[tensor.name] = tensor
        if as_inputs:
            if tensor.name not in listed:
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
            continue
        stand_in = graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        _point_at(stand_in, "<in memory>", 0, tensor_nbytes(tensor))
    return skeleton, weights


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's values, from its shape and type (reading `raw_data` would copy them)."""
    count = 1
    for d in tensor.dims:
        count *= max(d, 0)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):  # undefined or exotic types: only ever small here
        itemsize = 1
    return count * itemsize


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of a protobuf message but `skip` (messages and lists are copied, not shared)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(Path(path), text.encode())


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a saved model, external data files included."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load_model(str(path), load_external_data=False)
    seen = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            loc = {e.key: e.value for e in tensor.external_data}.get("location")
            if loc and loc not in seen:
                seen.add(loc)
                total += (path.parent / loc).stat().st_size
    return total


def serialized_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model takes when saved as one protobuf (what `save_model` writes for models under 2 GB)."""
    if is_big(model):  # over 2 GiB protobuf will not even size it (and walks every byte trying): add up parts
        g = model.graph
        return sum(tensor_nbytes(t) for t in g.initializer) + sum(
            item.ByteSize() for part in (g.node, g.input, g.output, g.value_info) for item in part)
    return model.ByteSize()


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """An editable onnx-graphsurgeon copy of `model` (the proto itself is never modified)."""
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping `like`'s IR version, producer and metadata where they still apply."""
    model = _export(graph)
    model.ir_version = max(like.ir_version, _min_ir_for(model))
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    _keep_subgraphs(model, like)
    toposort(model.graph)  # graphsurgeon's sort ignores what subgraphs read from the enclosing scope
    if model.ir_version < 4:
        # IR < 4 requires every initializer to be listed among the graph inputs too.
        listed = {i.name for i in model.graph.input}
        for init in model.graph.initializer:
            if init.name not in listed:
                model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


def _export(graph: gs.Graph, fill: bool = True) -> onnx.ModelProto:
    """`gs.export_onnx`, with each large constant copied into the model once (or, `fill=False`, not at all).

    graphsurgeon copies every initializer into a new graph, then the graph into a new model (two copies of all
    weights at once), and writes a renamed constant's name into the TensorProto it was imported from (the
    previous model's). Large constants are exported as bytes-less stand-ins instead and filled in afterwards.
    """
    swapped, renamed = [], []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        values = tensor._values
        source = values.tensor if isinstance(values, gs.ir.tensor.LazyValues) else None
        if isinstance(source, onnx.TensorProto) and source.name != tensor.name:
            copy = onnx.TensorProto()  # export would write the new name into the previous model's tensor
            copy.CopyFrom(source)
            tensor._values = gs.ir.tensor.LazyValues(copy)
            renamed.append((tensor, values))
            values, source = tensor._values, copy
        if tensor._export_dtype is not None or tensor.data_location not in (None, onnx.TensorProto.DEFAULT):
            continue  # a dtype conversion or external data on export: left to graphsurgeon
        if isinstance(source, onnx.TensorProto) and tensor_nbytes(source) > _LARGE_TENSOR_BYTES \
                and source.data_location != onnx.TensorProto.EXTERNAL:
            stand_in = onnx.TensorProto(name=tensor.name, data_type=source.data_type, dims=source.dims)
        elif isinstance(values, np.ndarray) and values.nbytes > _LARGE_TENSOR_BYTES and values.dtype.kind in "fiub":
            stand_in = onnx.TensorProto(name=tensor.name, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype),
                                        dims=values.shape)
        else:
            continue
        if not fill:
            _point_at(stand_in, "<in memory>", 0, tensor_nbytes(stand_in))
        tensor._values = gs.ir.tensor.LazyValues(stand_in)
        swapped.append((tensor, values))
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in swapped + renamed[::-1]:
            tensor._values = values
    originals = {tensor.name: values for tensor, values in swapped} if fill else {}
    nested = [t for n in subgraph_nodes(model) for sub in subgraphs(n) for t in _all_initializers(sub)]
    for init in list(model.graph.initializer) + (nested if originals else []):
        values = originals.get(init.name)
        if values is None:
            continue
        name = init.name
        if isinstance(values, np.ndarray):
            init.CopyFrom(onnx.numpy_helper.from_array(values, name))
        else:
            init.CopyFrom(values.tensor)
            init.name = name
    return model


#: Attributes whose default the ONNX spec gives in words rather than in the schema: 1 (strides, dilations) or 0
#: (pads, output_padding) along every spatial axis, on the convolution and pooling ops.
_SPATIAL_DEFAULTS = {"strides": 1, "dilations": 1, "pads": 0, "output_padding": 0}
_SPATIAL_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"})


def drop_default_attributes(model: onnx.ModelProto) -> int:
    """Remove, from the main graph's standard-domain nodes, every attribute set to the value the ONNX spec gives
    when it is absent (the schema's default at the model's opset, and the spatial defaults above); returns how many.
    Runtimes read the two forms alike; the file is smaller (on a quantized mobile model ~1 % of it)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        return 0
    removed = 0
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, version, "")
        except onnx.defs.SchemaError:
            continue
        kept = [a for a in node.attribute if not _is_default(node.op_type, a, schema)]
        if len(kept) < len(node.attribute):
            removed += len(node.attribute) - len(kept)
            del node.attribute[:]
            node.attribute.extend(kept)
    return removed


def _is_default(op_type: str, attribute: onnx.AttributeProto, schema) -> bool:
    if op_type in _SPATIAL_OPS and attribute.name in _SPATIAL_DEFAULTS:
        return attribute.type == onnx.AttributeProto.INTS and len(attribute.ints) > 0 \
            and all(v == _SPATIAL_DEFAULTS[attribute.name] for v in attribute.ints)
    spec = schema.attributes.get(attribute.name)
    if spec is None or spec.default_value.type == onnx.AttributeProto.UNDEFINED \
            or spec.default_value.type != attribute.type:
        return False
    return onnx.helper.get_attribute_value(spec.default_value) == onnx.helper.get_attribute_value(attribute)


def export_without_weights(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model whose large initializers carry no bytes (marked as external data, dims and type kept):
    for shape inference and analyses that need the structure, at any model size and without copying weights."""
    return _export(graph, fill=False)


def subgraph_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The main graph's control-flow nodes: those that carry subgraphs (If, Loop, Scan, ...)."""
    return [n for n in model.graph.node
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]


def _keep_subgraphs(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Put back the subgraphs of control-flow nodes as they were in `like`; passes do not rewrite subgraphs.

    graphsurgeon's export copies every outer-scope constant a subgraph reads into that subgraph (a weight read
    by both branches of an If is stored twice), rewrites its value_info, and constant-folds inside it. Each
    control-flow node that is still there (same name and op) gets its original subgraphs back, and the
    outer-scope weights they read come back to the main graph if the pass dropped them.
    """
    before: dict[tuple, list[onnx.NodeProto]] = {}
    for node in subgraph_nodes(like):
        before.setdefault((node.name, node.op_type, node.domain), []).append(node)
    restored = []
    for node in subgraph_nodes(model):
        same = before.get((node.name, node.op_type, node.domain), [])
        if len(same) != 1 or not node.name:
            continue
        del node.attribute[:]
        node.attribute.extend(same[0].attribute)
        restored.append(node)
    if not restored:
        return
    g = model.graph
    available = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    originals = {t.name: t for t in like.graph.initializer}
    for node in restored:
        for name in sorted(outer_reads(node) - available):
            if name in originals:
                g.initializer.append(originals[name])
                available.add(name)


def toposort(graph: onnx.GraphProto) -> bool:
    """Order `graph`'s nodes (and its subgraphs', recursively) so that every tensor is produced before it is read,
    counting what control-flow subgraphs read from the enclosing scope (ONNX requires that; graphsurgeon's sort
    ignores it). Stable: nodes already in order keep it. True when any node (here or in a subgraph) moved."""
    moved = False
    for node in graph.node:
        for sub in subgraphs(node):
            moved |= toposort(sub)
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    deps = [sorted({producer[name] for name in set(node.input) | outer_reads(node) if name in producer} - {i})
            for i, node in enumerate(nodes)]
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    for root in range(len(nodes)):
        if state[root]:
            continue
        state[root] = 1
        stack = [(root, iter(deps[root]))]
        while stack:
            index, pending = stack[-1]
            nxt = next((d for d in pending if state[d] == 0), None)
            if nxt is None:
                stack.pop()
                state[index] = 2
                order.append(index)
            else:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    if order == list(range(len(nodes))):
        return moved
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a control-flow node carries (If branches, Loop/Scan bodies)."""
    return [g for a in node.attribute
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                      list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])]


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names `node`'s subgraphs read from the scope around `node` (not produced or declared inside them)."""
    names: set[str] = set()
    for sub in subgraphs(node):
        local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
        for inner in sub.node:
            names |= {i for i in inner.input if i and i not in local}
            names |= outer_reads(inner) - local
            local |= set(inner.output)
        names |= {o.name for o in sub.output if o.name not in local}
    return names


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers of `graph` and of the subgraphs nested in it."""
    found = list(graph.initializer)
    for node in graph.node:
        for sub in subgraphs(node):
            found += _all_initializers(sub)
    return found


def _min_ir_for(model: onnx.ModelProto) -> int:
    """The lowest IR version that supports the model's default-domain opset."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for ir, max_opset in ((3, 8), (4, 9), (5, 10), (6, 11), (7, 15), (8, 18), (9, 20), (10, 22)):
        if opset <= max_opset:
            return ir
    return 11

