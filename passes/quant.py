"""`quant`: integer quantization as QDQ (QuantizeLinear / DequantizeLinear) in the ONNX graph.

Weights: symmetric, per output channel (or per tensor), stored as int8 initializers (`bits=8`), or with fewer
bits bit-packed and rebuilt to int8 by standard ops, or as ONNX INT4 tensors (`int4=onnx`, opset 21; ONNX
Runtime runs them, TVM 0.27 cannot load INT4 tensors). Activations (`activations`, on by default when real
calibration data is given) are placed as ONNX Runtime's `quantize_static` places them, so ORT fuses the groups
into int8 kernels (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, QLinearMul): every input and output of a
quantized layer (and, with `elementwise`, of Add/Mul between activations) gets one shared per-tensor uint8
QuantizeLinear → DequantizeLinear pair; a layer's output goes to its QuantizeLinear alone (every reader takes the
DequantizeLinear); a Relu/Clip right after a layer is absorbed when the calibrated range lies inside its bounds;
biases are int32 with scale input scale × weight scale; a BatchNormalization the export left after a layer is
folded into it first (as `fold-bn`), so the int8 kernel applies it; a HardSigmoid between int8 tensors becomes an
Add quantized so that the uint8 range is its clip (`_integer_gates`). Tensors whose quantization alone moves the
outputs far more than the typical one does (`sensitive`, measured on the calibration data by `quant_sensitivity`)
stay float, within a budget of the MACs they take off the int8 kernels. Ranges are calibrated by `method`:
- `minmax`: the observed range;
- `percentile`: the `percentile`-th percentile of the values (and the mirrored one below), clipping outliers;
- `mse`: the clipping range that minimises the mean squared quantization error of the calibration values.

Rounding (`rounding`): `nearest`; `bias-correct` (the default) adds the mean output error on the calibration data
to the bias (Nagel et al., "Data-Free Quantization", ICCV 2019): on validation splits of eight corpus models'
calibration samples (benchmarks/results/quant_rounding.md) it lowers the output rel-L2 by 4 % in geometric mean
(ppocrv6_tiny_det −25 %, sri_resnet_a −15 %, squeezenet +22 % where 32 images fit it) and moves no task metric
beyond its standard error; without real calibration data it rounds to nearest; `adaround` learns, per layer,
whether each weight rounds up or down so the layer's output on the calibration data changes least (Nagel et al.,
"Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020), then corrects the bias.

Per-channel DequantizeLinear needs opset 13 (ONNX Runtime rejects `axis` before): older models are upgraded with
onnx.version_converter first. TVM 0.27 lowers QDQ to float arithmetic (it folds the weight dequantization into
float constants and runs float kernels): there the result is int8 storage, float compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from squeeze.context import Context
from squeeze.registry import Backoff, Range, register_pass, step_up

from squeeze.errors import PassError

from .fold_bn import fold_all
from .quant_sensitivity import (CHEAP, FLOAT_BUDGET, MIN_GAIN, NOISE_GAIN, Probe, fusion_costs, outliers, site_errors,
                                validated_float)
from .weights import (Builder, Layer, calibrate, find_layers, foldable_dequantize, has_subgraphs, select_layers,
                      upgrade_opset)

COMPUTE = ("int8 kernels in ONNX Runtime (fused QDQ); in TVM the targets compute these layers in int8 where "
           "they have integer kernels (each target row says int8, mixed or float)")
ACTIVATION_SAMPLE = 400_000   # calibration values kept per activation tensor (uniformly sampled)
MSE_CANDIDATES = 100
GRAM_LIMIT = 2048             # AdaRound uses the inputs' Gram matrix up to this many inputs per output
ZETA, GAMMA = 1.1, -0.1       # AdaRound's rectified sigmoid stretch
ELEMENTWISE = ("Add", "Mul")  # binary ops quantized around (ONNX Runtime: QLinearAdd, QLinearMul)
GATES = ("HardSigmoid", "Sigmoid")  # cheap gates whose output may join the int8 region of an Add/Mul it feeds
#: Cheap one-input functions (besides the gates) through which the int8 region reaches an Add/Mul: a decomposed
#: GELU's x / √2 → Erf (quantize_static quantizes its Add/Mul tail: three QLinear ops in place of three float ones
#: over the whole tensor, for one QuantizeLinear after the Erf), Tanh, and the Resize of an FPN's top-down path
#: (whose Add then is a QLinearAdd). Div/Mul/Sub/Add by a scalar constant pass it on too (the Div of GELU).
UNARY = ("Erf", "Tanh", "Resize")


@register_pass("quant", backoff=Backoff("bits", step_up(8), skip="skip"))
def quant(graph: gs.Graph, ctx: Context, *,
          bits: Annotated[int, Range(2, 8), "weight bits, symmetric (activations are always 8-bit)"] = 8,
          per_channel: Annotated[bool, "one weight scale per output channel (opset ≥ 13; older models are "
                                 "upgraded)"] = True,
          activations: Annotated[bool | None, "quantize layer inputs to uint8 too; default: on when --calib "
                                 "data is given"] = None,
          method: Annotated[Literal["minmax", "percentile", "mse"], "activation range calibration"] = "mse",
          percentile: Annotated[float, Range(90.0, 100.0), "percentile kept by method=percentile"] = 99.99,
          rounding: Annotated[Literal["nearest", "bias-correct", "adaround"], "weight rounding: to nearest, "
                              "plus bias correction (the default: 4 % lower output error in geometric mean on "
                              "validation splits, benchmarks/results/quant_rounding.md), or learned on the calibration "
                              "data (AdaRound)"] = "bias-correct",
          skip: Annotated[list[str], "layers left in float: node names, op types, patterns, first, last"]
          = [],  # noqa: B006 (never mutated)
          int4: Annotated[Literal["packed", "onnx"], "bits ≤ 4: bit-packed and rebuilt to int8 (runs "
                          "everywhere), or ONNX INT4 tensors (opset 21; TVM 0.27 cannot load them)"] = "packed",
          iters: Annotated[int, Range(10, 100_000), "AdaRound optimisation steps per layer"] = 1000,
          elementwise: Annotated[bool, "also quantize Add/Mul between activations (ONNX Runtime then runs "
                                 "QLinearAdd/QLinearMul instead of converting around them)"] = True,
          sensitive: Annotated[float, Range(0.0, 1e6), "activations whose measured output error (that tensor alone "
                               "quantized, on calibration data) exceeds this × the median stay float; 0: off"] = 4.0,
          fold_bn: Annotated[bool, "fold BatchNormalization into its layer first (lossless), so the int8 kernel "
                             "applies it; false keeps them (for a later `slim`, which ranks channels by BN γ)"] = True,
          ) -> None:
    """Int8 QDQ: per-channel symmetric weights, calibrated uint8 activations, optional AdaRound."""
    onnx_int4 = int4 == "onnx" and bits <= 4
    model, per_channel = _opset_for(graph, ctx, per_channel, onnx_int4)
    norms, _ = fold_all(graph) if fold_bn else ([], [])
    if norms:
        ctx.note(f"{len(norms)} BatchNormalization(s) folded into their layer (lossless, as `fold-bn`): the int8 "
                 "kernel then applies them, where each ran in float between a DequantizeLinear and a QuantizeLinear")
    quantize_inputs = activations if activations is not None else not ctx.calib_is_synthetic
    gates = _hardswish_as_gate(graph, ops=quantize_inputs)
    if gates:
        ctx.note(f"{gates} hard-swish(es) (x·Clip(x + 3, 0, 6) / 6, or HardSwish ops where activations are "
                 "quantized) rewritten as x·HardSigmoid(x) (the same function): the Mul then joins the int8 region "
                 "as QLinearMul, where the hard-swish ran in float between a DequantizeLinear and a QuantizeLinear")
    folded_adds = _fold_bias_adds(graph)
    if folded_adds:
        ctx.note(f"{folded_adds} per-channel Add(s) after a Conv folded into its bias, so the int8 kernel adds it "
                 "(ONNX Runtime does the same for float models)")
    if gates or norms:  # calibration runs the rewritten graph (its gate tensors are new)
        model = _exported(graph, model)
    layers, skipped = select_layers(find_layers(graph), skip)
    if activations and ctx.calib_is_synthetic:
        ctx.note("activation ranges come from synthetic N(0,1) inputs; pass --calib with real inputs")
    fused = {l.name for l in layers if l.values is not None and np.isfinite(l.values).all()}
    floats = _float_tensors(model) if quantize_inputs else set()
    ops = _elementwise_ops(graph, floats, [l for l in layers if l.name in fused]) \
        if quantize_inputs and elementwise else []
    sites = _activation_sites(graph, layers, fused, ops, floats) if quantize_inputs else {}
    names = sorted(set(sites) | {s.inner.name for s in sites.values() if s.inner is not None})
    chunk = 8
    stats = _ActivationStats(names, ctx.seed, chunks=-(-len(ctx.calib) // chunk))
    # Layer input rows serve the learned rounding and the per-layer sensitivity table.
    rows = calibrate(model, ctx.calib, layers, seed=ctx.seed, threads=ctx.threads,
                     tensors=names, on_chunk=stats.add, chunk=chunk)
    ranges = {name: stats.range(name, method, percentile) for name in names}
    builder = Builder(graph, name_nodes=False)
    learn = rounding != "nearest" and not ctx.calib_is_synthetic
    if rounding != "nearest" and ctx.calib_is_synthetic:
        ctx.note(f"weights rounded to nearest: rounding={rounding} fits on real calibration data (--calib), and "
                 "there is none")
    per_layer, scales = _quantize_weights(builder, layers, rows, ranges, skipped, bits, per_channel, onnx_int4,
                                          rounding, learn, iters, ctx.seed)
    sources = {l.name: l.input.name for l in layers}
    kept_float = _sensitive_sites(ctx, model, ranges, sensitive) if names and sensitive > 0 else []
    sites = {k: v for k, v in sites.items() if k not in kept_float}
    sites = _settle_folds(graph, sites, ranges)
    sites = {k: v for k, v in sites.items() if v.folds is not None or k not in kept_float}
    zero_points: dict[int, gs.Constant] = {}
    _quantize_scalars(builder, ops, zero_points)
    scale_constants = {name: _insert_qdq(builder, site, *ranges[name], f"a{j}", zero_points)
                       for j, (name, site) in enumerate(sites.items())}
    biases = sum(_quantize_bias(builder, l, scale_constants[sources[l.name]], *scales[l.name], f"b{k}")
                 for k, l in enumerate(layers) if l.name in scales and sources[l.name] in sites)
    refolded = _foldable_float_weights(builder, layers, scales) if quantize_inputs else 0
    integer_gates = _integer_gates(builder, graph, zero_points) if quantize_inputs else 0
    _untype_intermediates(graph)
    folded = sum(1 for s in sites.values() if s.folds is not None)
    outputs = sum(1 for s in sites.values() if s.produced)
    _report(ctx, per_layer, skipped, bits, per_channel, quantize_inputs, method, len(sites), onnx_int4, rounding,
            learn)
    if quantize_inputs:
        ctx.details["activations"].update(outputs=outputs, folded=folded)
        ctx.note(f"{outputs} layer output(s) quantized too, so ONNX Runtime fuses DequantizeLinear → layer → "
                 f"QuantizeLinear into int8 kernels (QLinearConv, QGemm, QLinearMatMul)"
                 + (f"; {folded} Relu/Clip absorbed by the uint8 range of their output" if folded else ""))
    if integer_gates:
        ctx.note(f"{integer_gates} HardSigmoid(s) between int8 tensors computed as Add(x, β/α) quantized to "
                 "[0, 1/α] (the clip is the uint8 range; α folds into the next DequantizeLinear's scale): ONNX "
                 "Runtime runs a QLinearAdd where HardSigmoid ran in float between a DequantizeLinear and a "
                 "QuantizeLinear")
    if refolded:
        ctx.note(f"{refolded} layer(s) run in float (an input or output kept float, or no int8 kernel for the op): "
                 "their int8 weights are read as Cast(int8) · scale, which runtimes fold at load into a constant "
                 "the float kernel prepacks (a DequantizeLinear is recomputed every run; same values)")
    if biases:
        ctx.note(f"{biases} bias(es) stored as int32 with scale input_scale × weight_scale (as an integer "
                 "kernel adds them; ONNX Runtime would otherwise requantize float biases itself)")


def _opset_for(graph: gs.Graph, ctx: Context, per_channel: bool, onnx_int4: bool) -> tuple[onnx.ModelProto, bool]:
    """The model at the opset the QDQ form needs (per-channel axis: 13, INT4: 21), and whether per-channel scales
    are still possible (not when upgrading would rewrite control-flow subgraphs)."""
    need = 21 if onnx_int4 else (13 if per_channel else 10)
    model = ctx.model
    before = int(graph.opset or need)
    if before < need and has_subgraphs(ctx.model):
        # onnx.version_converter would rewrite the If/Loop/Scan bodies too, which this pass does not own.
        if before >= 10 and not onnx_int4:
            per_channel, need = False, 10
            ctx.note(f"per-tensor weight scales: per-channel needs opset 13, and upgrading opset {before} would "
                     "rewrite the model's control-flow subgraphs")
        else:
            raise PassError(f"quant needs opset {need} (the model has {before}), and the upgrade would rewrite "
                            "the model's control-flow subgraphs (If/Loop/Scan); upgrade the model first")
    if before < need:
        model = upgrade_opset(graph, ctx.model, need)
        ctx.note(f"opset upgraded {before} → {need} with onnx.version_converter "
                 f"({'INT4 tensors' if onnx_int4 else 'per-channel DequantizeLinear needs axis'})")
        ctx.details["opset"] = {"from": before, "to": need}
    return model, per_channel


def _quantize_weights(builder, layers, rows, ranges, skipped, bits, per_channel, onnx_int4, rounding, learn,
                      iters, seed) -> tuple[list[dict], dict]:
    """Quantize every layer's weight (`learn`: `rounding` may use the layer's calibration rows); the report rows
    and each layer's weight scales."""
    per_layer, scales = [], {}
    for k, layer in enumerate(layers):
        entry = {"layer": layer.name, "op": layer.op}
        x = rows.get(layer.name)
        act = ranges.get(layer.input.name)
        w = layer.values
        if w is not None and not np.isfinite(w).all():
            skipped[layer.name] = "its weight holds NaN or inf"
            w = None
        if w is None:
            entry["weights"] = "kept (computed, already compressed, or not finite)"
        else:
            entry.update(_quantize_weight(builder, layer, w, bits, per_channel, onnx_int4, x if learn else None,
                                          rounding, iters, seed, f"w{k}"))
        if x is not None and w is not None:
            entry["sqnr_db"] = _sqnr(layer, w, entry["_dequantized"], x, act)
        if w is not None:
            scales[layer.name] = entry.pop("_scale")
        entry.pop("_dequantized", None)
        if act is not None:
            entry["input_scale"], entry["input_zero_point"] = act[0], act[1]
        per_layer.append(entry)
    return per_layer, scales


def _foldable_float_weights(builder: Builder, layers: list[Layer], scales: dict) -> int:
    """Rewrite the weight DequantizeLinear of every layer that no runtime runs with an int8 kernel as
    `foldable_dequantize` (same values): a layer whose input is not quantized, a ConvTranspose (neither ONNX
    Runtime's CPU QDQ fusion nor squeeze's TVM int8 rewrite has one), and a grouped Conv whose output is not
    quantized (ONNX Runtime fuses DQ → Conv → Q only; the TVM int8 rewrite takes groups = 1 only, where a float
    output still computes in int8, so those keep the DequantizeLinear). Returns how many."""
    count = 0
    for layer in layers:
        if layer.name not in scales:
            continue
        deq = layer.weight.inputs[0] if layer.weight.inputs else None
        if deq is None or deq.op != "DequantizeLinear" or not _runs_in_float(layer):
            continue
        scale, axis, _ = scales[layer.name]
        shape = list(deq.inputs[0].shape or layer.weight.shape or [])
        if not shape:
            continue
        out = foldable_dequantize(builder, deq.inputs[0], scale, axis, shape, f"{deq.outputs[0].name}f")
        layer.node.inputs[layer.weight_index] = out
        deq.outputs.clear()
        count += 1
    return count


def _integer_gates(builder: Builder, graph: gs.Graph, zero_points: dict[int, gs.Constant]) -> int:
    """DQ(x) → HardSigmoid(α, β) → Q(s, z) → DQ(s, z) → readers, with α, β > 0, becomes
    DQ(x), DQ(β/α) → Add → Q(1/(255·α), 0) → DQ(1/255, 0) → readers: HardSigmoid(x) = α·clip(x + β/α, 0, 1/α),
    the QuantizeLinear clips to [0, 255 steps of 1/(255·α)] = [0, 1/α] exactly, and the DequantizeLinear's scale
    applies α (a DequantizeLinear may read the uint8 tensor at any scale). The gate keeps 255 steps over [0, 1], as
    calibrated, and ONNX Runtime fuses the Add into a QLinearAdd (it has no integer HardSigmoid). Returns how many."""
    count = 0
    shared: dict = {}

    def constant(key, make):
        if key not in shared:
            shared[key] = make(len(shared))
        return shared[key]

    for node in list(graph.nodes):
        if node.op != "HardSigmoid" or len(node.outputs[0].outputs) != 1:
            continue
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        q = node.outputs[0].outputs[0]
        readers = list(q.outputs[0].outputs) if q.op == "QuantizeLinear" else []
        if alpha <= 0 or beta <= 0 or not _dequantized_activation(node.inputs[0]) or not readers \
                or any(r.op != "DequantizeLinear" for r in readers) or node.outputs[0] in graph.outputs:
            continue
        shift = np.float32(beta / alpha)
        zero = _zero_point(builder, 0, zero_points)
        offset = constant(("offset", float(shift)), lambda k: builder.op(
            "DequantizeLinear", [builder.const(f"g{k}", np.array(1, np.uint8)),
                                 builder.const(f"g{k}s", np.array(shift, np.float32)), zero], f"g{k}d", None, None))
        node.op, node.attrs = "Add", {}
        node.inputs.append(offset)
        q.inputs[1] = constant(("range", alpha), lambda k: builder.const(
            f"g{k}", np.array(1.0 / (255.0 * alpha), np.float32)))
        q.inputs[2] = zero
        step = constant(("step",), lambda k: builder.const(f"g{k}", np.array(1.0 / 255.0, np.float32)))
        for r in readers:
            r.inputs[1], r.inputs[2] = step, zero
        count += 1
    return count


def _dequantized_activation(tensor: gs.Tensor) -> bool:
    """`tensor` is an activation's QuantizeLinear → DequantizeLinear output (an int8 kernel can read it)."""
    dq = tensor.inputs[0] if tensor.inputs else None
    return dq is not None and dq.op == "DequantizeLinear" and bool(dq.inputs[0].inputs) \
        and dq.inputs[0].inputs[0].op == "QuantizeLinear"


def _runs_in_float(layer: Layer) -> bool:
    """Whether every runtime squeeze measures runs this quantized-weight layer with a float kernel."""
    if not _dequantized_activation(layer.input) or layer.op == "ConvTranspose":
        return True
    out = layer.node.outputs[0]
    return layer.op == "Conv" and layer.groups > 1 \
        and not (out.outputs and all(r.op == "QuantizeLinear" for r in out.outputs))


def _fold_bias_adds(graph: gs.Graph) -> int:
    """Conv → Add(constant per output channel) becomes one Conv with that bias (exact): quantized, the Add would
    sit between the QLinearConv and the next layer in float, with a QuantizeLinear of the bias-less output."""
    count = 0
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Conv" or len(node.outputs) != 1 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w, out = node.inputs[1].values, node.outputs[0]
        if w.dtype != np.float32 or len(out.outputs) != 1 or id(out) in outputs or out.outputs[0].op != "Add":
            continue
        add = out.outputs[0]
        others = [t for t in add.inputs if t is not out]
        if len(add.inputs) != 2 or len(others) != 1 or not isinstance(others[0], gs.Constant):
            continue
        b = others[0].values
        channels, spatial = w.shape[0], w.ndim - 2
        if b.dtype != np.float32 or b.size not in (1, channels) or b.ndim > w.ndim \
                or (b.size > 1 and b.shape[-spatial - 1:] != (channels,) + (1,) * spatial):
            continue
        old = node.inputs[2].values if len(node.inputs) > 2 and node.inputs[2].name else None
        if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            continue
        bias = np.broadcast_to(b.ravel(), (channels,)).astype(np.float32)
        bias = bias + (old if old is not None else 0)
        constant = gs.Constant(f"{node.name}_bias_folded", bias.astype(np.float32))
        if len(node.inputs) > 2:
            node.inputs[2] = constant
        else:
            node.inputs.append(constant)
        node.outputs[0] = add.outputs[0]
        add.inputs.clear()
        add.outputs.clear()
        count += 1
    return count


def _scalar(t: gs.Tensor) -> float | None:
    """The value of a float constant with one element, else None."""
    if isinstance(t, gs.Constant) and t.values.size == 1 and t.values.dtype.kind == "f":
        return float(t.values.ravel()[0])
    return None


def _only_reader(t: gs.Tensor, outputs: set[int]) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 and id(t) not in outputs else None


def _hardswish_as_gate(graph: gs.Graph, ops: bool = True) -> int:
    """x·Clip(x + 3, 0, 6) / 6 (or · 1/6; the decomposed hard-swish of paddle2onnx and other exporters), and the
    HardSwish op (`ops`: only where activations are quantized; in float one op beats two), become
    x·HardSigmoid(x, α = 1/6, β = 0.5), the same function (float rounding aside). Quantized, the gate then sits
    between int8 tensors as `GATES` do, and the Mul is a QLinearMul; decomposed, the four float ops over a whole
    feature map ran between a DequantizeLinear and a QuantizeLinear after every Conv."""
    outputs = {id(t) for t in graph.outputs}
    count = 0
    for node in list(graph.nodes):  # the HardSwish op (opset 14; torch and paddle2onnx export it): the same rewrite
        if ops and node.op == "HardSwish" and len(node.inputs) == 1 and isinstance(node.inputs[0], gs.Variable):
            _gate_mul(graph, node.inputs[0], node.outputs[0], node.name or node.inputs[0].name)
            node.inputs.clear()
            node.outputs.clear()
            count += 1
    for add in list(graph.nodes):
        if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
            continue
        consts = [_scalar(t) for t in add.inputs]
        if consts[1] == 3.0 and isinstance(add.inputs[0], gs.Variable):
            x = add.inputs[0]
        elif consts[0] == 3.0 and isinstance(add.inputs[1], gs.Variable):
            x = add.inputs[1]
        else:
            continue
        clip = _only_reader(add.outputs[0], outputs)
        if clip is None or clip.op != "Clip" or clip.inputs[0] is not add.outputs[0] or _clip_bounds(clip) != (0.0, 6.0):
            continue
        mul = _only_reader(clip.outputs[0], outputs)
        if mul is None or mul.op != "Mul" or len(mul.inputs) != 2 or {id(t) for t in mul.inputs} != {id(x), id(clip.outputs[0])}:
            continue
        last = _only_reader(mul.outputs[0], outputs)
        if last is None or len(last.inputs) != 2 or last.inputs[0] is not mul.outputs[0]:
            continue
        c = _scalar(last.inputs[1])
        if not ((last.op == "Div" and c == 6.0) or (last.op == "Mul" and c is not None and abs(c * 6 - 1) < 1e-6)):
            continue
        _gate_mul(graph, x, last.outputs[0], add.name or x.name)
        for node in (add, clip, mul, last):
            node.inputs.clear()
            node.outputs.clear()
        count += 1
    return count


def _gate_mul(graph: gs.Graph, x: gs.Variable, out: gs.Variable, name: str) -> None:
    """out = x·HardSigmoid(x, α = 1/6, β = 0.5): hard-swish as a gate and a Mul."""
    gate = gs.Variable(f"{name}_hsig", dtype=np.float32)
    graph.nodes.append(gs.Node("HardSigmoid", f"{name}_hsig", {"alpha": 1.0 / 6, "beta": 0.5}, inputs=[x],
                               outputs=[gate]))
    graph.nodes.append(gs.Node("Mul", f"{name}_hswish", inputs=[x, gate], outputs=[out]))


def _exported(graph: gs.Graph, source: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` (cleaned up, sorted) as a model with `source`'s IR version and opsets."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = source.ir_version
    del model.opset_import[:]
    model.opset_import.extend(source.opset_import)
    return model


def _untype_intermediates(graph: gs.Graph) -> None:
    """Forget the types and shapes of intermediate tensors, so the file carries no value_info: ONNX Runtime and
    TVM infer them, and in a small int8 model the entries cost several percent of the file."""
    io = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in io:
            tensor.dtype, tensor.shape = None, None


# ---------------------------------------------------------------------------------------------- weights

def _weight_scale(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """Symmetric scales: max |w| per output channel (or overall) over qmax; never zero."""
    if axis is None:
        peak = np.abs(w).max(initial=0.0)
    else:
        peak = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    scale = (np.asarray(peak, np.float64) / qmax).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def _broadcast(scale: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _quantize_weight(builder: Builder, layer: Layer, w: np.ndarray, bits: int, per_channel: bool, onnx_int4: bool,
                     x: np.ndarray | None, rounding: str, iters: int, seed: int, short_name: str) -> dict:
    """Replace the layer's weight by symmetric integers → DequantizeLinear; the new tensors are named from
    `short_name` (names are a large part of a small int8 file)."""
    qmax = (1 << (bits - 1)) - 1
    axis = layer.out_axis if per_channel else None
    if axis is not None and layer.op == "ConvTranspose" and layer.groups > 1:
        axis = None  # output channels are split over groups on axis 1: one scale per tensor instead
    scale = _half_exact(_weight_scale(w.astype(np.float32), axis, qmax))
    full = _broadcast(scale, axis, w.ndim)
    w32 = w.astype(np.float32)
    q = np.clip(np.round(w32 / full), -qmax, qmax)
    info: dict = {"bits": bits, "scales": int(scale.size)}
    if x is not None and rounding == "adaround" and layer.has_matrix:
        learned, gain = _adaround(layer, w32, full, qmax, x, iters, seed)
        if learned is not None:
            q = learned
            info["adaround_error_ratio"] = gain
    dequantized = (q * full).astype(np.float32)
    if x is not None and rounding in ("bias-correct", "adaround"):
        _correct_bias(builder, layer, w32, dequantized, x)
        info["bias_corrected"] = layer.bias() is not None
    q = q.astype(np.int8)
    name = short_name
    stored, info["storage"] = builder.integers(q, bits, name, onnx_int4)
    attrs = {"axis": axis} if axis is not None else {}
    scale_tensor = _compact_scale(builder, scale, f"{name}s")
    deq = builder.op("DequantizeLinear", [stored, scale_tensor], f"{name}d", np.float32, list(w.shape), **attrs)
    if w.dtype != np.float32:
        deq = builder.op("Cast", [deq], f"{name}c", w.dtype, list(w.shape), to=onnx.helper.np_dtype_to_tensor_dtype(w.dtype))
    layer.node.inputs[layer.weight_index] = deq
    info["_dequantized"] = dequantized
    info["_scale"] = (scale, axis, scale_tensor)
    return info


def _quantize_bias(builder: Builder, layer: Layer, input_scale: gs.Constant, weight_scale: np.ndarray,
                   axis: int | None, weight_scale_tensor: gs.Tensor, name: str) -> int:
    """Store a Conv/Gemm bias as int32 with scale input_scale × weight_scale, dequantized in the graph."""
    if layer.op not in ("Conv", "Gemm") or layer.output_scale() != 1.0:
        return 0
    if len(layer.node.inputs) < 3 or not layer.node.inputs[2].name:
        return 0
    bias = layer.bias()
    if bias is None:
        return 0
    scale = (np.float32(input_scale.values) * weight_scale.astype(np.float32)).astype(np.float32)
    if axis is None:
        scale = scale.reshape(())
    q = np.clip(np.round(bias / np.where(scale > 0, scale, 1)), -2**31, 2**31 - 1).astype(np.int32)
    attrs = {"axis": 0} if scale.ndim else {}
    # the scale is computed in the graph (ONNX Runtime and TVM fold it when they load the model): it would
    # otherwise store one more float per output channel
    product = builder.op("Mul", [weight_scale_tensor, input_scale], f"{name}s", None, None)
    deq = builder.op("DequantizeLinear", [_compact_integers(builder, q, name), product], f"{name}d", None, None,
                     **attrs)
    if layer.op == "Gemm":
        layer.node.attrs["beta"] = 1.0
    layer.node.inputs[2] = deq
    return 1


def _adaround(layer: Layer, w: np.ndarray, full_scale: np.ndarray, qmax: int, x: np.ndarray, iters: int,
              seed: int) -> tuple[np.ndarray | None, float]:
    """Learned rounding (AdaRound): minimise ‖(Ŵ − W)·Xᵀ‖² over the rounding direction of every weight.

    Ŵ = s·clip(⌊W/s⌋ + h(V)), h the rectified sigmoid; the regulariser Σ 1 − |2h − 1|^β (β annealed 20 → 2)
    drives h to 0 or 1. Optimised with Adam in the [groups, outputs, inputs] matrix view. Returns the integer
    weights (None if learned rounding is not better than rounding to nearest on the calibration rows) and the
    ratio of output errors learned / nearest.
    """
    rng = np.random.default_rng(seed)
    wm = layer.matrix(w).astype(np.float64)
    sm = layer.matrix(np.broadcast_to(full_scale, w.shape).astype(np.float64))
    scaled = wm / sm
    floor = np.floor(scaled)
    rest = scaled - floor
    v = -np.log((ZETA - GAMMA) / (np.clip(rest, 1e-4, 1 - 1e-4) - GAMMA) - 1)
    groups, outs, inputs = wm.shape
    xs = x.astype(np.float64)
    use_gram = inputs <= GRAM_LIMIT
    if use_gram:
        gram = np.einsum("gpd,gpe->gde", xs, xs) / xs.shape[1]
    else:
        keep = min(xs.shape[1], max(64, 2_000_000 // inputs))
        xs = xs[:, rng.permutation(xs.shape[1])[:keep]]

    def error(wq: np.ndarray) -> tuple[float, np.ndarray]:
        delta = wq - wm
        if use_gram:
            gd = np.einsum("god,gde->goe", delta, gram)
            return float(np.einsum("god,god->", delta, gd)), 2 * gd
        r = np.einsum("god,gpd->gop", delta, xs) / xs.shape[1]
        return float(np.einsum("gop,gop->", r, r)) * xs.shape[1], 2 * np.einsum("gop,gpd->god", r, xs)

    def weights(q: np.ndarray) -> np.ndarray:
        return sm * np.clip(q, -qmax, qmax)

    nearest = np.clip(np.round(scaled), -qmax, qmax)
    base, _ = error(weights(nearest))
    if base <= 0:
        return None, 1.0
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    # the output error is normalised by its value at round-to-nearest, the regulariser averaged over weights
    lr, b1, b2, lam, warm = 1e-2, 0.9, 0.999, 3.0, 0.2
    for t in range(1, iters + 1):
        sig = 1 / (1 + np.exp(-v))
        h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0, 1)
        q = floor + h
        inside = (q >= -qmax) & (q <= qmax)
        _, grad_w = error(weights(q))
        grad = grad_w / base * sm * inside
        progress = (t / iters - warm) / (1 - warm)
        if progress > 0:  # after the warm-up, the regulariser pulls every h to 0 or 1
            beta = 2 + 18 * max(0.0, 1 - progress)
            u = 2 * h - 1
            grad = grad - lam * beta * np.sign(u) * np.abs(u) ** (beta - 1) * 2 / h.size
        grad = grad * ((h > 0) & (h < 1)) * sig * (1 - sig) * (ZETA - GAMMA)
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        v -= lr * (m1 / (1 - b1 ** t)) / (np.sqrt(m2 / (1 - b2 ** t)) + 1e-8)
    h = np.clip(1 / (1 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0, 1)
    learned = np.clip(floor + (h >= 0.5), -qmax, qmax)
    got, _ = error(weights(learned))
    if got >= base:
        return None, 1.0
    return layer.from_matrix(learned), round(got / base, 4)


def _correct_bias(builder: Builder, layer: Layer, w: np.ndarray, dequantized: np.ndarray, x: np.ndarray) -> None:
    """Add (W − Ŵ)·E[x] over the calibration rows to the bias, so the mean output is unchanged."""
    bias = layer.bias()
    if bias is None:
        return
    mean = x.astype(np.float64).mean(axis=1)
    delta = np.einsum("god,gd->go", layer.matrix(w).astype(np.float64) - layer.matrix(dequantized), mean).ravel()
    layer.set_bias(builder, bias + layer.output_scale() * delta, w.dtype)


def _sqnr(layer: Layer, w: np.ndarray, dequantized: np.ndarray, x: np.ndarray, act) -> float:
    """Signal-to-quantization-noise ratio (dB) of the layer's output on the calibration rows, with its input
    quantized as it will be (when activations are quantized): the per-layer sensitivity shown in the report."""
    xq = x if act is None else _fake_quant(x, act[0], act[1])
    ref = np.einsum("gpd,god->gpo", x, layer.matrix(w.astype(np.float32)))
    new = np.einsum("gpd,god->gpo", xq, layer.matrix(dequantized))
    noise = float(np.sum((new - ref) ** 2))
    return round(float(10 * np.log10(float(np.sum(ref ** 2)) / noise)), 2) if noise > 0 else float("inf")


# ---------------------------------------------------------------------------------------------- activations

@dataclass
class _Site:
    """A float tensor that gets one shared QuantizeLinear → DequantizeLinear pair.

    `produced`: a quantized layer writes it, so *every* reader takes the DequantizeLinear (ONNX Runtime fuses
    DQ → Conv → Q into QLinearConv only when the layer's output goes to the QuantizeLinear alone). Otherwise only
    the quantized layers in `readers` do, and other readers keep the float tensor (no cost, no error).
    `folds`: a Relu/Clip between the quantized layer and this tensor; when the calibrated uint8 range lies inside
    its bounds the QuantizeLinear clamps exactly as it does, and the node goes (as quantize_static removes it);
    `inner` is the layer's own output, quantized instead when it cannot go.
    """

    tensor: gs.Variable
    readers: list[gs.Node] = field(default_factory=list)
    produced: bool = False
    folds: gs.Node | None = None
    inner: gs.Variable | None = None


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 activations of `model`: graph inputs and node outputs that depend on a graph input
    (constant subgraphs are not activations), typed by onnx shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    floats = {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    dynamic = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # topologically sorted (the checker requires it)
        if any(i in dynamic for i in node.input):
            dynamic.update(node.output)
    return floats & dynamic


def _elementwise_ops(graph: gs.Graph, floats: set[str], fused: list[Layer]) -> list[gs.Node]:
    """The Add/Mul that join the int8 region: quantize_static's binary ops (two float activations, or one and a
    scalar constant stored exactly in uint8; ONNX Runtime runs them as QLinearAdd / QLinearMul), kept only where
    every activation input is int8 anyway (written by a quantized layer, past a Relu/Clip it may absorb, or by
    another kept op, or read by a quantized layer, or the output of a cheap one-input function of such a tensor:
    a HardSigmoid/Sigmoid gate (hard-swish, squeeze-and-excitation scaling), a decomposed GELU's x/√2 → Erf, an
    FPN's Resize) and some reader is int8 too (a quantized layer or a kept op, directly or through such a function).

    Elsewhere the op stays float, and so do the tensors around it: inside a decomposed LayerNorm (whose other
    inputs come from ReduceMean, Sqrt, ...) quantizing adds QuantizeLinear nodes that ONNX Runtime cannot fuse and
    costs accuracy. (A GELU's tail is quantized as quantize_static does: with QDQ around it ONNX Runtime does not
    fuse the pattern into its Gelu kernel anyway, and the float Add/Mul/Mul over the feature map cost ppocrv6_tiny_det
    ~15 % of its int8 latency.)"""
    candidates = []
    for node in graph.nodes:
        if node.op not in ELEMENTWISE or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        if node.outputs[0].name not in floats:
            continue
        variables = [t for t in node.inputs if isinstance(t, gs.Variable)]
        constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if not variables or any(t.name not in floats for t in variables):
            continue
        if constants and (constants[0].values.size != 1 or constants[0].values.dtype != np.float32
                          or not np.isfinite(constants[0].values).all()):
            continue
        candidates.append(node)
    produced = {layer.input.name for layer in fused}  # quantized anyway: its readers can take the int8 form
    for layer in fused:
        out = layer.node.outputs[0]
        act = _clamp_after(out)
        produced.add((act.outputs[0] if act is not None else out).name)
    readers = {id(l.node) for l in fused}
    gates = [n for n in graph.nodes if len(n.outputs) == 1 and n.outputs[0].name in floats and len(n.inputs) >= 1
             and (n.op in GATES + UNARY or _scalar_arithmetic(n))]
    kept = list(candidates)
    while True:
        ids = {id(n) for n in kept}
        region = produced | {n.outputs[0].name for n in kept}
        grown = True
        while grown:  # x·HardSigmoid(x), SE scaling, GELU's x/√2 → Erf: the output a kept op reads is quantized,
            grown = False  # as quantize_static does (chains of them in any node order)
            for gate in gates:
                if gate.inputs[0].name in region and gate.outputs[0].name not in region:
                    region.add(gate.outputs[0].name)
                    grown = True
        int8 = readers | ids
        nxt = [n for n in kept
               if all(t.name in region for t in n.inputs if isinstance(t, gs.Variable))
               and any(_int8_reader(r, int8) for r in _readers_past_clamp(n.outputs[0]))]
        if len(nxt) == len(kept):
            return kept
        kept = nxt


def _int8_reader(node: gs.Node, int8: set[int], depth: int = 3) -> bool:
    """`node` (by id) reads the int8 form: it is in `int8`, or a `UNARY` function (Resize, Erf) whose output such a
    node reads, up to `depth` functions deep."""
    return id(node) in int8 or (depth > 0 and node.op in UNARY and len(node.outputs) == 1
                                and any(_int8_reader(r, int8, depth - 1) for r in node.outputs[0].outputs))


def _scalar_arithmetic(node: gs.Node) -> bool:
    """Div/Mul/Sub/Add of a variable (first input) by one float scalar constant."""
    if node.op not in ("Div", "Mul", "Sub", "Add") or len(node.inputs) != 2:
        return False
    first, second = node.inputs
    return isinstance(first, gs.Variable) and _scalar(second) is not None


def _readers_past_clamp(tensor: gs.Variable) -> list[gs.Node]:
    """The nodes that read `tensor`, or its Relu/Clip's output when that is its only reader."""
    act = _clamp_after(tensor)
    return list(act.outputs[0].outputs) if act is not None else list(tensor.outputs)


def _activation_sites(graph: gs.Graph, layers: list[Layer], fused: set[str], elementwise: list[gs.Node],
                      floats: set[str]) -> dict[str, _Site]:
    """The tensors to quantize: every input of a quantized layer or elementwise op, and the output of every
    layer whose weight is quantized (`fused`) and of every elementwise op, past a Relu/Clip that the output range
    can absorb; graph outputs stay float."""
    outputs = {t.name for t in graph.outputs}
    sites: dict[str, _Site] = {}
    readers = [(l.node, [l.input]) for l in layers] + [(n, list(n.inputs)) for n in elementwise]
    for node, inputs in readers:
        for t in inputs:
            if isinstance(t, gs.Variable) and t.name in floats:
                site = sites.setdefault(t.name, _Site(t))
                if node not in site.readers:
                    site.readers.append(node)
    writers = [l.node for l in layers if l.name in fused] + elementwise
    for node in writers:
        if len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if out.name not in floats or out.name in outputs:
            continue
        act = _clamp_after(out)
        if act is not None and act.outputs[0].name not in outputs and act.outputs[0].name in floats:
            site = sites.setdefault(act.outputs[0].name, _Site(act.outputs[0]))
            site.produced, site.folds, site.inner = True, act, out
        else:
            sites.setdefault(out.name, _Site(out)).produced = True
    return sites


def _quantize_scalars(builder: Builder, elementwise: list[gs.Node], zero_points: dict[int, gs.Constant]) -> None:
    """The scalar constant of an elementwise op as uint8 + DequantizeLinear, exact: (255 − zp)·(c/255) = c.
    Equal constants share one DequantizeLinear."""
    done: dict[tuple, gs.Variable] = {}
    for node in elementwise:
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant):
                continue
            c = float(t.values.ravel()[0])
            key = (c, t.values.shape)
            if key not in done:
                scale = np.float32(abs(c) / 255.0) if c else np.float32(1.0)
                q, zp = (255, 0) if c >= 0 else (0, 255)
                name = f"c{len(done)}"
                stored = builder.shared(("u8", q if c else 0, t.values.shape), f"u{q if c else 0}",
                                        np.array(q if c else 0, np.uint8).reshape(t.values.shape))
                done[key] = builder.op("DequantizeLinear", [stored, builder.const(f"{name}s", scale),
                                                            _zero_point(builder, zp, zero_points)],
                                       f"{name}d", None, None)
            node.inputs[i] = done[key]


def _sensitive_sites(ctx: Context, model: onnx.ModelProto, ranges: dict[str, tuple[float, int]],
                     factor: float) -> list[str]:
    """The activation tensors to keep float: the outliers of the one-at-a-time sensitivity (quant_sensitivity),
    each kept only if the held-out calibration samples confirm that it lowers the whole model's error (a float
    tensor costs ONNX Runtime the int8 fusion of the layers that read and write it)."""
    if ctx.calib_is_synthetic:
        return []
    probe = Probe(model, ranges, ctx.threads)
    errors, samples = site_errors(model, ranges, ctx.calib, ctx.threads, probe)
    worst = outliers(errors, factor)
    shapes = {k: tuple(v.shape) for k, v in ctx.calib.samples(1)[0].items()}
    costs = fusion_costs(model, worst, shapes) if worst else {}
    kept, trace = validated_float(probe, worst, ctx.calib, costs=costs) if worst else ([], [])
    ctx.details["activation_sensitivity"] = {
        "samples": samples, "factor": factor, "median_error": round(float(np.median(list(errors.values()))), 6),
        "outliers": {k: round(errors[k], 6) for k in worst}, "kept_float": kept,
        "int8_macs_lost_if_float": {k: round(costs[k], 4) for k in worst},
        "held_out_error": [round(e, 6) for e in trace]}
    if worst:
        ctx.note(f"{len(worst)} activation tensor(s) move the outputs more than {factor:g}× the median tensor "
                 f"does when quantized alone (measured on {samples} calibration sample(s)); {len(kept)} kept float, "
                 f"those that lower the held-out error of the whole model by ≥ {MIN_GAIN:.0%} each ({NOISE_GAIN:.0%} "
                 f"where ONNX Runtime keeps int8 kernels for ≥ {1 - CHEAP:.0%} of the MACs anyway), at most "
                 f"{FLOAT_BUDGET:.1%} of the MACs off the int8 kernels in all "
                 f"({trace[0]:.4f} → {trace[-1]:.4f})" + (": " + ", ".join(kept[:5]) if kept else "")
                 + (" ..." if len(kept) > 5 else ""))
    return kept


def _clamp_after(out: gs.Variable) -> gs.Node | None:
    """The Relu, or Clip with constant bounds, that is the only reader of `out`; None otherwise."""
    if len(out.outputs) != 1:
        return None
    node = out.outputs[0]
    if node.op == "Relu" or (node.op == "Clip" and _clip_bounds(node) is not None):
        return node if node.inputs[0] is out else None
    return None


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Relu or Clip (constant bounds; opset < 11 attributes or opset ≥ 11 inputs)."""
    if node.op == "Relu":
        return 0.0, np.inf
    lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    for i, default in ((1, lo), (2, hi)):
        if len(node.inputs) > i and node.inputs[i].name:
            if not isinstance(node.inputs[i], gs.Constant) or node.inputs[i].values.size != 1:
                return None
            value = float(node.inputs[i].values.ravel()[0])
            lo, hi = (value, hi) if i == 1 else (lo, value)
    return lo, hi


def _absorbs(bounds: tuple[float, float], scale: float, zero_point: int) -> bool:
    """Whether uint8 quantization with (scale, zero point) clamps to within `bounds` (half a step of slack)."""
    lo, hi = -zero_point * scale, (255 - zero_point) * scale
    return bounds[0] <= lo + scale / 2 and hi - scale / 2 <= bounds[1]


def _settle_folds(graph: gs.Graph, sites: dict[str, _Site], ranges: dict) -> dict[str, _Site]:
    """Remove each Relu/Clip its output range absorbs (the layer then writes the clamped tensor itself), else
    quantize the layer's own output. Returns the final sites; max pools between them keep their input's range."""
    final: dict[str, _Site] = {}
    for name, site in sites.items():
        if site.folds is None:
            final[name] = site
            continue
        act, inner = site.folds, site.inner
        if _absorbs(_clip_bounds(act), *ranges[name]):
            layer_node = inner.inputs[0]
            layer_node.outputs[0] = site.tensor
            act.inputs.clear()
            act.outputs.clear()
            final[name] = site
            continue
        final[inner.name] = _Site(inner, produced=True)
        if site.readers:
            final[name] = _Site(site.tensor, readers=site.readers)
    # A max pool between quantized tensors keeps its input's scale and zero point (as quantize_static does): it
    # picks input values, so that is exact, and only then does ONNX Runtime run DQ → MaxPool → Q as an int8 pool.
    for node in graph.nodes:  # in graph order: chains of pools share one range
        if node.op == "MaxPool" and node.inputs and {node.inputs[0].name, node.outputs[0].name} <= final.keys():
            ranges[node.outputs[0].name] = ranges[node.inputs[0].name]
    return final


def _zero_point(builder: Builder, value: int, shared: dict[int, gs.Constant]) -> gs.Constant:
    """The uint8 zero point `value`, one scalar initializer per value (a 0-d tensor: ONNX Runtime fuses
    QLinearAdd / QLinearMul only with scalar scales and zero points, and shape [1] is not scalar to it)."""
    if value not in shared:
        shared[value] = builder.const(f"z{value}", np.array(value, np.uint8))
    return shared[value]


def _half_exact(scale: np.ndarray) -> np.ndarray:
    """`scale` rounded to the nearest float16 value when every entry is a normal float16 (the integers are then
    computed with that scale, so storing it in float16 loses nothing); unchanged otherwise."""
    half = scale.astype(np.float16)
    if np.all(np.isfinite(half)) and np.all(np.abs(half) >= np.finfo(np.float16).tiny):
        return half.astype(np.float32)
    return scale


def _compact_scale(builder: Builder, scale: np.ndarray, name: str) -> gs.Tensor:
    """A per-channel float32 scale as float16 + Cast when that is exact and the smaller file (ONNX Runtime folds
    the Cast when it loads the model, before it fuses the QDQ groups); scalars and other values as float32."""
    exact = scale.size > 1 and np.array_equal(scale.astype(np.float16).astype(np.float32), scale)
    return _stored(builder, scale, scale.astype(np.float16) if exact else None, name)


def _compact_integers(builder: Builder, q: np.ndarray, name: str) -> gs.Tensor:
    """int32 bias integers as int16 + Cast when they fit and that is the smaller file (ONNX Runtime folds the Cast
    at load)."""
    fits = q.size > 1 and np.abs(q).max(initial=0) < 2 ** 15
    return _stored(builder, q, q.astype(np.int16) if fits else None, name)


def _stored(builder: Builder, wide: np.ndarray, narrow: np.ndarray | None, name: str) -> gs.Tensor:
    """`wide` as a constant, or `narrow` (the same values in a smaller type) + a Cast back to `wide`'s type where
    that serialises smaller."""
    to = onnx.helper.np_dtype_to_tensor_dtype(wide.dtype)
    if narrow is not None:
        cast = onnx.helper.make_node("Cast", [f"{name}h"], [name], to=to)
        if onnx.numpy_helper.from_array(narrow, f"{name}h").ByteSize() + cast.ByteSize() \
                < onnx.numpy_helper.from_array(wide, name).ByteSize():
            return builder.op("Cast", [builder.const(f"{name}h", narrow)], name, None, None, to=to)
    return builder.const(name, wide)


def _insert_qdq(builder: Builder, site: _Site, scale: float, zero_point: int, name: str,
                zero_points: dict[int, gs.Constant]) -> gs.Constant:
    """tensor → QuantizeLinear → DequantizeLinear → its readers (all of them when a quantized layer writes it,
    else the quantized layers only); returns the scale constant. The new tensors are left untyped (shape
    inference knows them; the file carries no value_info for them) and the nodes unnamed."""
    tensor = site.tensor
    s = builder.const(f"{name}s", np.array(scale, np.float32))
    z = _zero_point(builder, zero_point, zero_points)
    readers = list(tensor.outputs) if site.produced else site.readers
    q = builder.op("QuantizeLinear", [tensor, s, z], f"{name}q", None, None)
    dq = builder.op("DequantizeLinear", [q, s, z], f"{name}d", None, None)
    for node in readers:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = dq
    return s


class _ActivationStats:
    """Exact min/max and a uniform sample of the values of each tensor, gathered chunk by chunk."""

    def __init__(self, names: list[str], seed: int, chunks: int):
        self.rng = np.random.default_rng(seed)
        self.quota = -(-ACTIVATION_SAMPLE // max(chunks, 1))
        self.lo = {n: np.inf for n in names}
        self.hi = {n: -np.inf for n in names}
        self.samples: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.seen = {n: 0 for n in names}

    def add(self, values: dict[str, np.ndarray]) -> None:
        for name, arr in values.items():
            flat = arr.astype(np.float32).ravel()
            self.lo[name] = min(self.lo[name], float(flat.min()))
            self.hi[name] = max(self.hi[name], float(flat.max()))
            self.seen[name] += flat.size
            take = min(flat.size, self.quota)
            self.samples[name].append(self.rng.choice(flat, size=take, replace=False) if take < flat.size else flat)

    def range(self, name: str, method: str, percentile: float) -> tuple[float, int]:
        """(scale, uint8 zero point) for `name`."""
        values = np.concatenate(self.samples[name])
        if values.size > ACTIVATION_SAMPLE:
            values = self.rng.choice(values, size=ACTIVATION_SAMPLE, replace=False)
        lo, hi = min(self.lo[name], 0.0), max(self.hi[name], 0.0)
        if method == "percentile":
            hi = max(float(np.percentile(values, percentile)), 0.0) if hi > 0 else 0.0
            lo = min(float(np.percentile(values, 100 - percentile)), 0.0) if lo < 0 else 0.0
        elif method == "mse":
            lo, hi = _mse_range(values, lo, hi)
        return _scale_zero_point(lo, hi)

    def sqnr(self, name: str, scale: float, zero_point: int) -> float:
        """Signal-to-quantization-noise ratio (dB) of the tensor's sampled values at (scale, zero point)."""
        values = np.concatenate(self.samples[name]).astype(np.float64)
        noise = float(np.sum((_fake_quant(values, scale, zero_point) - values) ** 2))
        signal = float(np.sum(values ** 2))
        return float(10 * np.log10(signal / noise)) if noise > 0 and signal > 0 else float("inf")


def _scale_zero_point(lo: float, hi: float) -> tuple[float, int]:
    if hi <= lo:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / 255.0))
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return scale, zero_point


def _fake_quant(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    s = np.float32(scale)
    return ((np.clip(np.round(x / s) + zero_point, 0, 255) - zero_point) * s).astype(np.float32)


def _mse_range(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The clipped range α·[lo, hi] (α in (0, 1]) whose uint8 quantization has the least squared error."""
    best = (np.inf, lo, hi)
    for alpha in np.linspace(1.0 / MSE_CANDIDATES, 1.0, MSE_CANDIDATES):
        scale, zp = _scale_zero_point(alpha * lo, alpha * hi)
        err = float(np.mean((_fake_quant(values, scale, zp) - values) ** 2))
        if err < best[0]:
            best = (err, alpha * lo, alpha * hi)
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------- report

def _report(ctx: Context, per_layer: list[dict], skipped: dict[str, str], bits: int, per_channel: bool,
            quantize_inputs: bool, method: str, tensors: int, onnx_int4: bool, rounding: str, learned: bool) -> None:
    weights = [e for e in per_layer if "bits" in e]
    ctx.details["compute"] = COMPUTE
    ctx.details["layers"] = [e["layer"] for e in per_layer]
    ctx.details["per_layer"] = per_layer
    ctx.details["weights"] = {"bits": bits, "per_channel": per_channel, "layers": len(weights),
                              "rounding": rounding if learned else "nearest",
                              "storage": weights[0]["storage"] if weights else None}
    ctx.details["activations"] = ({"dtype": "uint8", "granularity": "per tensor", "method": method,
                                   "tensors": tensors, "samples": len(ctx.calib)} if quantize_inputs else None)
    ctx.skipped(skipped, "left in float")
    if not per_layer:
        ctx.note("no Conv/Gemm/MatMul layer to quantize")
        return
    text = (f"{bits}-bit {'per-channel' if per_channel else 'per-tensor'} symmetric weights in "
            f"{len(weights)} layer(s)" if weights else "weights left as they are (computed, e.g. already compressed)")
    if quantize_inputs:
        text += f", uint8 activations at {tensors} layer input(s) ({method} calibration on {len(ctx.calib)} samples)"
    ctx.note(f"{text}; {COMPUTE}")
    if onnx_int4:
        ctx.note("weights stored as ONNX INT4 tensors: ONNX Runtime runs them; TVM 0.27 cannot load INT4 "
                 "(use int4=packed for TVM targets)")
    ranked = sorted((e for e in per_layer if isinstance(e.get("sqnr_db"), float) and np.isfinite(e["sqnr_db"])),
                    key=lambda e: e["sqnr_db"])
    if len(ranked) > 2:
        worst = ranked[:2]
        ctx.note("most sensitive layers (lowest output SQNR on calibration data): "
                 + ", ".join(f"{e['layer']} ({e['sqnr_db']:.1f} dB)" for e in worst)
                 + f"; skip=[{','.join(repr(e['layer']) for e in worst)}] keeps them in float")
