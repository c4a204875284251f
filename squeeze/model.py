"""Model I/O: load with validation, save atomically, measure file size.

The input model is only ever read. Saving writes to a temporary file in the destination folder and renames it
into place, so a reader never sees a half-written model and an interrupted run leaves the old file intact.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputError

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
        raise ModelLoadError(f"{path}: not a valid ONNX file (truncated or corrupt protobuf: {_first_line(exc)})") from exc
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
        raise ModelLoadError(f"{path}: cannot load external data: {_first_line(exc)}") from exc
    try:
        if model.ByteSize() < _EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ModelLoadError(f"{path}: fails the ONNX checker: {_first_line(exc)}") from exc
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
    folder = path.parent
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; refusing to write through it")
    if model.ByteSize() < _EXTERNAL_DATA_THRESHOLD:
        _atomic_write(path, model.SerializeToString(deterministic=True))
        return [path]
    # Large model: weights go to one external file beside it. Work on a copy so the caller's model stays in memory.
    data_name = path.name + ".data"
    big = onnx.ModelProto()
    big.CopyFrom(model)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".squeeze-") as tmp:
        onnx.save_model(big, os.path.join(tmp, path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(os.path.join(tmp, data_name), folder / data_name)
        os.replace(os.path.join(tmp, path.name), path)
    return [path, folder / data_name]


def _atomic_write(path: Path, data: bytes) -> None:
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
    _atomic_write(Path(path), text.encode())


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
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(like.ir_version, _min_ir_for(model))
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    _keep_subgraphs(model, like)
    if model.ir_version < 4:
        # IR < 4 requires every initializer to be listed among the graph inputs too.
        listed = {i.name for i in model.graph.input}
        for init in model.graph.initializer:
            if init.name not in listed:
                model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


def subgraph_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The main graph's control-flow nodes: those that carry subgraphs (If, Loop, Scan, ...)."""
    return [n for n in model.graph.node
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]


def _keep_subgraphs(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Put back the subgraphs of control-flow nodes as they were in `like`; passes do not rewrite subgraphs.

    graphsurgeon's export copies every outer-scope constant a subgraph reads into that subgraph (a weight read
    by both branches of an If is stored twice) and rewrites its value_info. Each control-flow node that is still
    there (same name and op) gets its original subgraphs back, and the outer-scope constants they read go back
    to the main graph.
    """
    before = {}
    for node in subgraph_nodes(like):
        before.setdefault((node.name, node.op_type, node.domain), []).append(node)
    local = {t.name for node in subgraph_nodes(like) for g in _subgraphs(node) for t in _all_initializers(g)}
    main = {t.name for t in model.graph.initializer}
    for node in subgraph_nodes(model):
        same = before.get((node.name, node.op_type, node.domain), [])
        if len(same) != 1 or not node.name:
            continue
        hoisted = [t for g in _subgraphs(node) for t in _all_initializers(g) if t.name not in local]
        del node.attribute[:]
        node.attribute.extend(same[0].attribute)
        for tensor in hoisted:
            if tensor.name not in main:
                main.add(tensor.name)
                model.graph.initializer.append(tensor)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers of `graph` and of the subgraphs nested in it."""
    found = list(graph.initializer)
    for node in graph.node:
        for sub in _subgraphs(node):
            found += _all_initializers(sub)
    return found


def _min_ir_for(model: onnx.ModelProto) -> int:
    """The lowest IR version that supports the model's default-domain opset."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for ir, max_opset in ((3, 8), (4, 9), (5, 10), (6, 11), (7, 15), (8, 18), (9, 20), (10, 22)):
        if opset <= max_opset:
            return ir
    return 11


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
