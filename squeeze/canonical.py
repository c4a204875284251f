"""The canonical front end: one lossless rewrite every model goes through before the first pass.

Real exported models (paddle2onnx, tf2onnx, torch.onnx) carry their weights as `Constant` nodes, compute shapes
with Shape→Gather→Concat chains, keep Identity and Dropout nodes, import old opsets, and put `If` nodes whose
subgraphs read outer-scope tensors. Passes should not each cope with that, so squeeze canonicalizes first:

- control-flow-aware topological order (a node that an `If`/`Loop` subgraph reads from comes first; graphsurgeon's
  toposort and onnxslim's dead-code removal both go wrong on graphs that are not in this order);
- OnnxSlim (a maintained simplifier; constant folding, dead-node and Identity removal, common subexpressions,
  `Constant` nodes to initializers, also inside subgraphs, and `If` nodes with a constant condition inlined),
  with its fusions and weight tying off: fusions change op types (Gelu, fused Conv+BN) that passes and TVM then
  see differently, and tied weights would couple layers that passes treat separately;
- the default-domain opset raised to at least 13 (ONNX's version converter; per-channel QDQ and the Slice-based
  rewrites need it) and opset imports of domains no node uses dropped.

The canonical model keeps the original's dynamic axes: an OCR pipeline feeds lines of any width. What compilers need
on top — every shape fixed and the shape arithmetic folded, so Reshape/Resize/Expand/Slice/Pad get constant shape
inputs — is `freeze_shapes`, applied to a copy at build time (targets/), never to the saved model.

Each step is verified: the result must pass the ONNX checker and give the same outputs as its input on the given
samples (ONNX Runtime); a step that fails that is skipped and the report says why.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from collections import Counter
from typing import Callable

import numpy as np
import onnx

from .errors import first_line
from .data import Dataset
from .model import is_big, subgraphs, toposort, without_weights

MIN_OPSET = 13
LOSSLESS_MAX_ABS_REL = 1e-4  # constant folding re-associates float arithmetic; a lossless rewrite stays well inside
CHECK_SAMPLES = 2


def canonicalize(model: onnx.ModelProto, data: Dataset | None = None, threads: int | None = None
                 ) -> tuple[onnx.ModelProto, dict]:
    """The canonical form of `model` and what was done (`steps`, node counts, seconds) for the report.

    `data` (its first few samples) checks that every step is lossless; without it only the checker runs.
    """
    start = time.perf_counter()
    report: dict = {"nodes_before": _count_nodes(model.graph), "ops_before": _op_counts(model.graph),
                    "opset_before": default_opset(model), "steps": [], "skipped": []}
    feeds = data.samples(CHECK_SAMPLES) if data is not None else []
    reference = _outputs(model, feeds, threads) if feeds else None
    current, done, skipped = _apply(model, _steps(model), None, None, threads)
    problem = _problem(current, feeds, reference, threads) if current is not model else None
    if problem:  # find the step to blame: apply them again one at a time, each verified
        current, done, skipped = _apply(model, _steps(model), feeds, reference, threads)
    report["steps"], report["skipped"] = done, skipped
    report.update(nodes_after=_count_nodes(current.graph), ops_after=_op_counts(current.graph),
                  opset_after=default_opset(current), seconds=round(time.perf_counter() - start, 3),
                  verified_on=f"{len(feeds)} sample(s), max abs rel error <= {LOSSLESS_MAX_ABS_REL:g}" if feeds
                  else "the ONNX checker only (no samples)")
    return current, report


def freeze_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` for compilers: the inputs fixed to `shapes`, shape arithmetic folded for them.

    Not lossless for other input sizes: build artifacts only, never the saved model. Returns `model` itself when
    nothing can be folded (or the simplifier fails: the compiler then reports what it cannot import).
    """
    if is_big(model):
        return model
    if model.ByteSize() > FROZEN_CACHE_BYTES:
        return _frozen(model, shapes) or model
    key = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest() + repr(sorted(shapes.items()))
    if key not in _FROZEN:  # a run compiles the same model for several targets (and the original besides)
        frozen = _frozen(model, shapes)
        while len(_FROZEN) >= FROZEN_CACHE:
            _FROZEN.pop(next(iter(_FROZEN)))
        _FROZEN[key] = frozen
    frozen = _FROZEN[key]
    if frozen is None:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(frozen)  # callers may change what they get; the cached model stays as it was
    return copy


def explicit_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every Conv's auto_pad=SAME_UPPER/SAME_LOWER spelled as explicit `pads` for its (static) input
    size (a copy; `model` itself when there is none). For compilers: TVM's ONNX frontend pads the input in a
    separate function before such a conv, which costs a pass over the map and, between a DequantizeLinear and
    the Conv, hides the int8 layer from targets that compute QDQ layers in integers (ppocrv6_tiny_det's stem:
    two 2×2 convs on 160×160 maps stayed float in its int8 model)."""
    todo = [i for i, n in enumerate(model.graph.node) if n.op_type == "Conv" and _auto_pad(n).startswith("SAME")]
    if not todo:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 (the compiler pads as it does)
        return model
    dims = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input):
        shape = info.type.tensor_type.shape
        dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = False
    for i in todo:
        node = out.graph.node[i]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        shape = dims.get(node.input[0])
        kernel = list(attrs.get("kernel_shape", inits.get(node.input[1], [])[2:]))
        if not shape or not kernel or any(d is None for d in shape[2:]) or len(shape) != len(kernel) + 2:
            continue
        rank = len(kernel)
        strides = list(attrs.get("strides", [1] * rank))
        dilations = list(attrs.get("dilations", [1] * rank))
        begin, end = [], []
        for size, k, st, dil in zip(shape[2:], kernel, strides, dilations):
            total = max((-(-size // st) - 1) * st + (k - 1) * dil + 1 - size, 0)
            small = total // 2
            begin.append(small if _auto_pad(node) == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute("pads", begin + end)])
        changed = True
    return out if changed else model


#: layers whose weight (input 1) `integer_weights` reads through a DequantizeLinear
INTEGER_WEIGHT_LAYERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def integer_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every weight of an `INTEGER_WEIGHT_LAYERS` layer that is int8 integers times a scale
    (Cast(int8) · scale, the foldable form `quant` writes for layers ONNX Runtime runs in float: a ConvTranspose,
    a layer whose output stays float) read through a DequantizeLinear instead, where the layer's input is
    dequantized (a copy; `model` itself when there is none). Same values bit for bit (DequantizeLinear with zero
    point 0 is float32(q) · scale); for compilers, which fold Cast · Mul into float constants on import and then
    cannot compute the layer in integers (the int8 rewrite of `targets/schedules/int8.py` reads DequantizeLinear;
    a float-output layer computes Σ (x − zx)·w exactly, then · sx·sw). Opset ≥ 13 (per-axis DequantizeLinear)."""
    opset = default_opset(model) or 0
    if opset < 13:
        return model
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    readers = Counter(i for n in graph.node for i in n.input)

    def constant(name: str) -> np.ndarray | None:
        if name in inits:
            return onnx.numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Cast" and node.input[0] in inits:
            to = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
            return onnx.numpy_helper.to_array(inits[node.input[0]]).astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        return None

    found = []
    for index, node in enumerate(graph.node):
        if node.op_type not in INTEGER_WEIGHT_LAYERS or len(node.input) < 2 or producer.get(node.input[0]) is None \
                or producer[node.input[0]].op_type != "DequantizeLinear":
            continue
        mul = producer.get(node.input[1])
        if mul is None or mul.op_type != "Mul" or readers[node.input[1]] != 1:
            continue
        for a, b in ((0, 1), (1, 0)):
            cast = producer.get(mul.input[a])
            scale = constant(mul.input[b])
            if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits or scale is None \
                    or scale.dtype != np.float32:
                continue
            q = onnx.numpy_helper.to_array(inits[cast.input[0]])
            to = next(onnx.helper.get_attribute_value(x) for x in cast.attribute if x.name == "to")
            axes = [i for i, d in enumerate(scale.shape) if d != 1]
            if q.dtype != np.int8 or to != onnx.TensorProto.FLOAT or scale.ndim not in (0, q.ndim) \
                    or len(axes) > 1 or (axes and scale.shape[axes[0]] != q.shape[axes[0]]):
                continue
            found.append((index, cast.input[0], scale, axes[0] if axes else None))
            break
    if not found:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for index, stored, scale, axis in found:
        target = out.graph.node[index]
        name = f"{target.input[1]}_integer"
        scale_name = f"{name}_scale"
        out.graph.initializer.append(onnx.numpy_helper.from_array(
            scale.reshape(-1) if axis is not None else scale.reshape(()), scale_name))
        attrs = {"axis": axis} if axis is not None else {}
        out.graph.node.append(onnx.helper.make_node("DequantizeLinear", [stored, scale_name], [name],
                                                    name=name, **attrs))
        target.input[1] = name
    toposort(out.graph)
    return out


def _auto_pad(node: onnx.NodeProto) -> str:
    value = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


FROZEN_CACHE = 4                # frozen copies kept: a run needs the compressed and the original one
FROZEN_CACHE_BYTES = 64 << 20   # larger models are frozen again each time rather than held in memory
_FROZEN: dict[str, onnx.ModelProto | None] = {}


def _frozen(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto | None:
    try:
        frozen = _slim(_ordered(model), {name: list(dims) for name, dims in shapes.items()})
        onnx.checker.check_model(frozen)
    except Exception:  # the compiler gets the model as it is and names what it cannot import
        return None
    return frozen


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _apply(model: onnx.ModelProto, steps: list[tuple[str, "Step"]], feeds: list[dict] | None,
           reference: list[list[np.ndarray]] | None, threads: int | None
           ) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Run `steps` in order; with `feeds`, each result is verified and a step that fails is skipped."""
    current, done, skipped = model, [], []
    for name, step in steps:
        try:
            candidate, what = step(current)
        except Exception as exc:  # a step that cannot run on this model is skipped, not fatal
            skipped.append(f"{name}: {type(exc).__name__}: {first_line(exc)}")
            continue
        if candidate is current:
            continue
        problem = _problem(candidate, feeds, reference, threads) if feeds is not None else None
        if problem:
            skipped.append(f"{name}: {problem}")
            continue
        current = candidate
        if what:
            done.append(what)
    return current, done, skipped


# --- the steps, in order ------------------------------------------------------------------------------------------

Step = Callable[[onnx.ModelProto], tuple[onnx.ModelProto, str | None]]


def _steps(model: onnx.ModelProto) -> list[tuple[str, Step]]:
    steps: list[tuple[str, Step]] = [("order", _order_step), ("opset", _opset_step)]
    if not is_big(model):  # a model over 2 GB cannot pass through the simplifier's protobuf round trip
        steps.append(("simplify", _simplify_step))
    steps += [("constants", _constants_step), ("domains", _domains_step)]
    return steps


def _order_step(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if not toposort(copy.graph):  # subgraphs included: a reordered branch alone is a change too
        return model, None
    return copy, "put the nodes in topological order, counting what control-flow subgraphs read"


def _simplify_step(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    slim = _slim(model, None)
    before, after = _op_counts(model.graph), _op_counts(slim.graph)
    if before == after and len(slim.graph.initializer) == len(model.graph.initializer):
        return model, None
    gone = {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)}
    new = {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}
    parts = [f"{n} {op}" for op, n in sorted(gone.items(), key=lambda kv: (-kv[1], kv[0]))]
    text = (f"OnnxSlim folded constants and removed dead/duplicate nodes: {_count_nodes(model.graph)} → "
            f"{_count_nodes(slim.graph)} nodes (gone: {', '.join(parts) or 'none'}")
    if new:
        text += "; new: " + ", ".join(f"{n} {op}" for op, n in sorted(new.items()))
    return slim, text + ")"


def _constants_step(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Any `Constant` node left (the simplifier skipped or was not run) becomes an initializer of its graph."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    moved = _constants_to_initializers(copy.graph)
    if not moved:
        return model, None
    return copy, f"{moved} Constant node(s) became initializers"


def _opset_step(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    opset = default_opset(model)
    if opset is None or opset >= MIN_OPSET:
        return model, None
    from onnx import version_converter  # noqa: PLC0415
    upgraded = version_converter.convert_version(model, MIN_OPSET)
    upgraded.ir_version = max(upgraded.ir_version, model.ir_version)
    return upgraded, f"opset {opset} → {MIN_OPSET} (ONNX version converter)"


def _domains_step(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    used = {n.domain for n in _all_nodes(model.graph)} | {f.domain for f in model.functions}
    unused = [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx") and o.domain not in used]
    if not unused:
        return model, None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [o for o in copy.opset_import if o.domain not in unused]
    del copy.opset_import[:]
    copy.opset_import.extend(keep)
    return copy, f"dropped opset import(s) no node uses: {', '.join(sorted(unused))}"


# --- helpers ------------------------------------------------------------------------------------------------------

def _ordered(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    toposort(copy.graph)
    return copy


#: integer initializer types a model stores compressed weights in (int8 quantized, bit-packed codebook indices)
COMPRESSED_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                    onnx.TensorProto.INT16, onnx.TensorProto.UINT16)
COMPRESSED_MIN_ELEMENTS = 16  # smaller integer constants (zero points, shape pieces) fold as before


def _slim(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """OnnxSlim without fusions and weight tying, quietly (it logs and prints tables). Compressed integer
    weights (`COMPRESSED_TYPES` initializers of `COMPRESSED_MIN_ELEMENTS` or more, read by ops other than
    DequantizeLinear, which OnnxSlim keeps) pass through it as graph inputs: its constant folding would otherwise
    turn their decompression (`quant`'s Cast(int8)·scale for layers run in float, `codebook`'s bit unpacking) into
    float initializers, undoing the compression of a model squeeze wrote (ppocrv6_tiny_det quant: 507 → 585 KB, and
    no int8 ConvTranspose for TVM)."""
    import onnxslim  # noqa: PLC0415
    kwargs: dict = {"skip_optimizations": ["graph_fusion", "weight_tying"], "model_check": False}
    if input_shapes:
        kwargs["input_shapes"] = [f"{name}:{','.join(str(d) for d in dims)}" for name, dims in input_shapes.items()]
    listed = {i.name for i in model.graph.input}  # IR < 4 lists initializers as inputs too: those stay listed
    held, model = _hold_compressed(model)
    if held and input_shapes:
        kwargs["input_shapes"] += [f"{t.name}:{','.join(str(d) for d in t.dims)}" for t in held]
    logger = logging.getLogger("onnxslim")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(_ordered(model), **kwargs)
    finally:
        logger.setLevel(level)
    if held:
        names = {t.name for t in held} - listed
        kept = [i for i in slim.graph.input if i.name not in names]
        del slim.graph.input[:]
        slim.graph.input.extend(kept)
        slim.graph.initializer.extend(held)
    slim.ir_version = max(slim.ir_version, model.ir_version)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(slim, field, getattr(model, field))
    del slim.metadata_props[:]
    slim.metadata_props.extend(model.metadata_props)
    toposort(slim.graph)
    return slim


def _hold_compressed(model: onnx.ModelProto) -> tuple[list[onnx.TensorProto], onnx.ModelProto]:
    """(the compressed integer initializers `_slim` holds back, `model` with them as graph inputs instead)."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    held = [t for t in model.graph.initializer if t.data_type in COMPRESSED_TYPES
            and int(np.prod(t.dims)) >= COMPRESSED_MIN_ELEMENTS and readers.get(t.name, set()) - {"DequantizeLinear"}]
    if not held:
        return [], model
    names = {t.name for t in held}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [t for t in out.graph.initializer if t.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    listed = {i.name for i in out.graph.input}
    out.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in held if t.name not in listed)
    return held, out  # `model`'s own tensors, unchanged (extending a graph with them copies them)


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    moved = 0
    keep = []
    for node in graph.node:
        for sub in subgraphs(node):
            moved += _constants_to_initializers(sub)
        tensor = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    from onnx import helper, numpy_helper  # noqa: PLC0415
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            copy = onnx.TensorProto()
            copy.CopyFrom(value)
            return copy
        if attr.name in _SCALAR_ATTRIBUTES:
            return numpy_helper.from_array(np.array(value, dtype=_SCALAR_ATTRIBUTES[attr.name]))
    return None  # sparse_value, value_string(s): left as a node


_SCALAR_ATTRIBUTES = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                      "value_ints": np.int64}


def _problem(candidate: onnx.ModelProto, feeds: list[dict], reference: list[list[np.ndarray]] | None,
             threads: int | None) -> str | None:
    """Why `candidate` is not a lossless rewrite (None when it is)."""
    try:
        checked = without_weights(candidate, as_inputs=True)[0] if is_big(candidate) else candidate
        onnx.checker.check_model(checked, full_check=True)
    except Exception as exc:
        return f"the result fails the ONNX checker ({first_line(exc)}); kept the model before this step"
    if not feeds or reference is None:
        return None
    try:
        got = _outputs(candidate, feeds, threads)
    except Exception as exc:
        return f"ONNX Runtime cannot run the result ({first_line(exc)}); kept the model before this step"
    for ref_sample, got_sample in zip(reference, got):
        for ref, new in zip(ref_sample, got_sample):
            if ref.shape != new.shape:
                return f"changed an output shape {list(ref.shape)} → {list(new.shape)}; kept the model before this step"
            if ref.dtype.kind not in "fc":
                if not np.array_equal(ref, new):
                    return "changed an integer output; kept the model before this step"
                continue
            ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
            scale = float(np.max(np.abs(ref64), initial=0.0)) or 1.0
            err = float(np.max(np.abs(ref64 - new64), initial=0.0)) / scale
            if not err <= LOSSLESS_MAX_ABS_REL:
                return (f"changed the outputs (max abs rel error {err:.2g} > {LOSSLESS_MAX_ABS_REL:g}); kept the "
                        f"model before this step")
    return None


def _outputs(model: onnx.ModelProto, feeds: list[dict], threads: int | None) -> list[list[np.ndarray]]:
    from .runtime import session  # noqa: PLC0415  (runtime imports data, which this module imports too)
    sess = session(model, threads, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    return [[np.asarray(v) for v in sess.run(names, feed)] for feed in feeds]


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    found = []
    for node in graph.node:
        found.append(node)
        for sub in subgraphs(node):
            found += _all_nodes(sub)
    return found


def _count_nodes(graph: onnx.GraphProto) -> int:
    return len(_all_nodes(graph))


def _op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in _all_nodes(graph)).items()))

