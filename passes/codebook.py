"""`codebook`: weight sharing with learned codebooks; the model stays a runnable ONNX graph.

Two granularities:
- `unit=weight` (Han et al., "Deep Compression", ICLR 2016): per layer, k-means with 2^bits centroids, linearly
  initialised between the smallest and largest weight; every weight becomes a `bits`-bit index.
- `unit=kernel` (Yu et al., "Kernel Quantization for Efficient Network Compression", 2020): per convolution,
  the k×k kernels are clustered into a codebook of `kernels` entries; every (output, input) kernel becomes an
  index, and the codebook values are quantized to `codebook_bits`. Layers without k×k kernels (1×1 convs,
  Gemm, MatMul) get the per-weight codebook.

With calibration data, per-weight codebooks are assigned GPTQ-style (`assign=gptq`, the default; Frantar et al.,
"GPTQ", ICLR 2023): input by input, each weight takes its nearest centroid and its output error, scaled through
the inverse of the layer's input Hessian H = X̃ᵀX̃, is spread over the inputs not yet assigned; centroids are then
refitted and the assignment repeated (`rounds`). Per layer, the Hessian damping (or the plain nearest-centroid
assignment) is chosen by the output error on held-out calibration samples: with fewer calibration rows than
inputs, a lightly damped GPTQ fits directions the data never spans. On the CIFAR corpus models this halves the
3-bit loss (benchmarks/results/codebook_bits.md). Layers with more than MAX_GPTQ_INPUTS inputs per group take the
nearest-centroid assignment (GPTQ's Hessian inverse grows as the cube of the inputs).

With `scale=channel` (unit=weight), every output channel is first divided by the RMS of its weights and the
codebook is shared by the normalised weights: w = s_c · c[label], s_c stored as float16 (2 bytes per channel) and
multiplied back by a Mul in the rebuild. Channels whose weights differ in range (up to 115× in the PP-OCR
recogniser) then each get the codebook's full resolution instead of a few levels of one layer-wide table; GPTQ and
the refit work on the normalised weights (a row's error is its scale² times its error in codebook units).

Weights that are exactly zero (unstructured pruning) keep a reserved zero centroid. With `compensate` (and real
calibration data), layer by layer in graph order, the centroids are refitted by least squares so that the layer
fed with the activations of the network compressed so far reproduces the float layer's outputs on the
calibration inputs (so it also absorbs the error of the layers before), and the bias takes the remaining mean
error (bias correction, Nagel et al. 2019).

The weight initializer is replaced by the codebook, the bit-packed indices, and the standard ops that rebuild
it (Cast, Gather, Add, Mul, Div, Sub, Reshape, Slice; with channel scales a Cast of the float16 scales and a
Mul), which ONNX Runtime runs and TVM folds at compile time. `squeeze pack` then Huffman codes the indices
(`squeeze.pack`).

Output layers (read by a model output with no other weight layer between, e.g. a classifier's last Gemm) that hold
under HEAD_SHARE of the clustered weights take `head_bits` (6) index bits: at 3 bits the 1000-weight classifier of
the CIFAR corpus ResNets alone added a third of the logits error, for under 1 % of the weights.
"""
from __future__ import annotations

import warnings
from typing import Annotated, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from squeeze.context import Context
from squeeze.errors import PassError
from squeeze.threads import single_threaded
from squeeze.registry import Backoff, Range, register_pass, step_up

from squeeze.model import to_model

from .graph_util import nearest_to_outputs
from .weights import Builder, Layer, calibrate, find_layers, has_subgraphs, select_layers, upgrade_opset

ZERO_SHARE = 0.01     # at least this fraction of exact zeros: keep them exact with a reserved centroid
RIDGE = 1e-3          # relative ridge of the least-squares refit, towards the k-means centroids
MAX_Z = 16_000_000    # floats in the refit's design matrix (rows are subsampled to stay under it)
MAX_GRAM_INPUTS = 4608  # a kernel refit needs the inputs' Gram matrix; larger layers skip the refit
# GPTQ inverts a D×D input Hessian (D³ work, 8·D² bytes) per damping tried: wider layers take the nearest-centroid
# assignment with refit. mnist_burn's 11616-input Gemm spent 3 minutes per run there and chose nearest anyway.
MAX_GPTQ_INPUTS = 4608
CALIB_ROWS = 8192      # input rows sampled per layer: GPTQ's Hessian needs several times more rows than inputs
CALIB_BUDGET = 8_000_000  # ... and at most this many floats per layer
MIN_BIAS_SAMPLES = 64  # per-channel bias corrections from fewer calibration samples are not trusted
# An output layer holding under this share of the clustered weights takes `head_bits` (its indices cost little).
HEAD_SHARE = 0.02


@register_pass("codebook", backoff=Backoff("bits", step_up(8), skip="skip"))
def codebook(graph: gs.Graph, ctx: Context, *,
             unit: Annotated[Literal["weight", "kernel"], "cluster single weights (Deep Compression) or whole "
                             "k×k kernels (Kernel Quantization)"] = "weight",
             bits: Annotated[int, Range(1, 8), "index bits per weight: 2^bits centroids per layer (unit=weight, "
                             "and layers without k×k kernels under unit=kernel)"] = 4,
             kernels: Annotated[int, Range(2, 256), "codebook entries per conv layer (unit=kernel)"] = 64,
             codebook_bits: Annotated[int, Range(0, 8), "bits per kernel-codebook value (unit=kernel); "
                                      "0 keeps it float"] = 6,
             compensate: Annotated[bool, "refit centroids by least squares on the layer outputs over the "
                                   "calibration data, then correct the bias"] = True,
             assign: Annotated[Literal["gptq", "nearest"], "how weights pick their centroid (unit=weight, with "
                               "calibration data): 'gptq' assigns input by input and spreads each one's output "
                               "error over the inputs not yet assigned through the inverse input Hessian (GPTQ, "
                               "Frantar et al. 2023); 'nearest' takes the nearest centroid (Deep Compression)"]
             = "gptq",
             rounds: Annotated[int, Range(1, 8), "gptq: alternations of assignment and centroid (and scale) "
                               "refit"] = 4,
             damp: Annotated[float, Range(0, 100), "gptq: damping of the input Hessian, relative to its mean "
                             "diagonal; 0 chooses per layer among 0.01, 0.1, 1 and the nearest-centroid "
                             "assignment by the output error on held-out calibration samples"] = 0.0,
             scale: Annotated[Literal["layer", "channel"], "unit=weight: 'channel' divides every output channel by "
                              "its RMS before the shared codebook and multiplies it back in the rebuild (w = s_c·q, "
                              "s_c stored as float16, one per output channel), so channels whose weights differ in "
                              "range share the codebook's levels; 'layer' clusters the weights as they are"]
             = "channel",
             weighted: Annotated[bool, "k-means weights every weight by its input's energy (the Hessian "
                                 "diagonal on the calibration data) instead of uniformly"] = False,
             skip: Annotated[list[str], "layers left in float: node names, op types, patterns, first, last"]
             = [],  # noqa: B006 (never mutated)
             layer_bits: Annotated[list[str], "per-layer index bits 'LAYER=B' (node name or pattern, B in 1..8); "
                                   "other layers use `bits` (what --goal writes)"] = [],  # noqa: B006
             head_bits: Annotated[int, Range(0, 8), "index bits (at least `bits`) of an output layer, one that a "
                                  "model output reads with no other weight layer between (a classifier's last "
                                  "Gemm), when it holds under 2 % of the clustered weights: its error reaches the "
                                  "outputs undamped and its indices cost little; 0: `bits` like the others; "
                                  "`layer_bits` overrides it"] = 6,
             ) -> None:
    """Share weights through per-layer codebooks: k-means over weights or k×k kernels, indices bit-packed."""
    model = _opset_for_tvm(graph, ctx)
    all_layers = find_layers(graph)
    bits_of = _layer_bits(layer_bits, all_layers)
    layers, skipped = select_layers(all_layers, skip)
    by_weight: dict[str, list[Layer]] = {}
    for layer in _usable(layers, skipped):
        by_weight.setdefault(layer.weight.name, []).append(layer)
    heads = _heads(graph, all_layers, by_weight, bits, head_bits, bits_of, unit)
    refit = compensate and not ctx.calib_is_synthetic
    if compensate and ctx.calib_is_synthetic:
        ctx.note("compensation skipped: the calibration data is synthetic noise; pass --calib with real inputs")
    tracked = [ls[0] for ls in by_weight.values() if len(ls) == 1]
    rows, samples = calibrate(model, ctx.calib, tracked, seed=ctx.seed, threads=ctx.threads, rows=CALIB_ROWS,
                              budget=CALIB_BUDGET, with_samples=True) if refit and tracked else ({}, {})
    builder = Builder(graph)
    per_layer, changed = [], False
    for consumers in by_weight.values():
        layer = consumers[0]
        w = layer.values
        kernel = _by_kernel(layer, unit)
        size = kernels if kernel else 1 << bits_of.get(layer.name, bits)
        x = rows.get(layer.name) if len(consumers) == 1 else None
        # channel scales, unless the layer already has no more distinct values than the codebook (kept exactly)
        s_full = _channel_scales(layer, w) if scale == "channel" and not kernel and w.ndim >= 2 \
            and len(np.unique(w)) > size else None
        normed = w if s_full is None else w.astype(np.float64) / s_full
        vectors = normed.reshape(-1, layer.kernel_size if kernel else 1).astype(np.float64)
        # per (group, output) row of the layer's matrix view: the scale the refit and GPTQ work under
        sm = layer.matrix(np.broadcast_to(s_full, w.shape).astype(np.float64))[:, :, 0] \
            if s_full is not None and x is not None else None
        # The inputs this layer will really see: those of the network compressed so far (same sampled rows).
        x_in = _compressed_rows(graph, ctx, layer) if x is not None and changed else x
        energy = _input_energy(layer, w, x_in) if weighted and x is not None and not kernel else None
        centroids, labels, zero = cluster(vectors, size, ctx.seed, energy)
        entry = {"layer": layer.name, "op": layer.op, "unit": "kernel" if kernel else "weight",
                 "params": int(w.size), "centroids": int(len(centroids)), "head": layer.name in heads,
                 "index_bits": _index_bits(len(centroids)), "zero_reserved": bool(zero)}
        if x is not None:
            entry["output_rel_err_kmeans"] = _output_error(layer, w, _expand(centroids, labels, w, s_full), x, x_in)
            gptq = assign == "gptq" and not kernel
            centroids, labels, s_full = _assign(layer, w, centroids, labels, x, x_in, samples[layer.name], zero,
                                                kernel, s_full, sm, rounds, damp, gptq, entry)
        codes = None
        if kernel and codebook_bits:
            codes, zero_point, step = _quantize_codebook(centroids, codebook_bits)
            centroids = (codes.astype(np.float32) - np.float32(zero_point)) * np.float32(step)
            entry["codebook_bits"] = codebook_bits
        shared = _expand(centroids.astype(w.dtype), labels, w, s_full)
        if s_full is not None:
            entry["channel_scales"] = int(s_full.size)
        entry["weight_rel_err"] = float(np.linalg.norm(shared - w) / max(np.linalg.norm(w), 1e-30))
        if x is not None:
            delta = _correct_bias(builder, layer, w, shared, x, x_in, samples[layer.name])
            entry["bias_corrected"] = delta is not None
            entry["output_rel_err"] = _output_error(layer, w, shared, x, x_in, delta)
        rebuilt = _rebuild(builder, layer, labels, centroids.astype(w.dtype), codes,
                           (zero_point, step, codebook_bits) if codes is not None else None, kernel, s_full)
        for c in consumers:
            c.node.inputs[c.weight_index] = rebuilt
        per_layer.append(entry)
        changed = True
    _report(ctx, per_layer, skipped, unit, refit, [c.name for ls in by_weight.values() for c in ls], heads)


def _heads(graph: gs.Graph, layers: list[Layer], by_weight: dict[str, list[Layer]], bits: int, head_bits: int,
           bits_of: dict[str, int], unit: str = "weight") -> dict[str, int]:
    """{output layer: index bits} for the clustered layers nearest the graph outputs that hold under HEAD_SHARE
    of the clustered weights and have no `layer_bits` entry; `bits_of` gets them. Under unit=kernel a k×k conv
    is clustered by kernels (its codebook has `kernels` entries), so only per-weight layers can be heads.
    Measured on the CIFAR corpus models (benchmarks/results/codebook_bits.md, validation): at 3 bits the
    1000-weight classifier alone added a third of the logits error."""
    if head_bits <= bits:
        return {}
    total = sum(ls[0].values.size for ls in by_weight.values())
    clustered = {id(ls[0].node): ls[0] for ls in by_weight.values() if len(ls) == 1}
    out = {}
    for node in nearest_to_outputs(graph, [layer.node for layer in layers]):
        layer = clustered.get(id(node))
        if layer is None or layer.name in bits_of or layer.values.size >= HEAD_SHARE * total:
            continue
        if not _by_kernel(layer, unit):
            out[layer.name] = bits_of[layer.name] = head_bits
    return out


def _by_kernel(layer: Layer, unit: str) -> bool:
    """Whether `layer` is clustered by whole k×k kernels (unit=kernel on a Conv/ConvTranspose with k > 1)."""
    return unit == "kernel" and layer.op in ("Conv", "ConvTranspose") and layer.kernel_size > 1


def _usable(layers: list[Layer], skipped: dict[str, str]) -> list[Layer]:
    """The layers whose weight is a finite float constant of at least two values; the others go to `skipped`."""
    usable = []
    for layer in layers:
        if layer.values is None:
            skipped[layer.name] = "its weight is computed, not a float constant (already compressed?)"
        elif layer.values.size < 2:
            skipped[layer.name] = "a single weight"
        elif not np.isfinite(layer.values).all():
            skipped[layer.name] = "its weight holds NaN or inf"
        else:
            usable.append(layer)
    return usable


def _assign(layer: Layer, w, centroids, labels, x, x_in, samples, zero, kernel: bool, s_full, sm, rounds: int,
            damp: float, gptq: bool, entry: dict):
    """Fit the codebook on the calibration rows: GPTQ assignment (with `damp`, or the damping or nearest
    assignment chosen on held-out samples when it is 0; nearest above MAX_GPTQ_INPUTS inputs) or nearest-centroid
    with a least-squares refit. Returns (centroids, labels, channel scales); records the damping in `entry`."""
    chosen = None
    if gptq and layer.matrix(w).shape[2] > MAX_GPTQ_INPUTS:
        entry["gptq_damp"] = None                        # nearest: too wide for GPTQ's Hessian inverse
    elif gptq:
        chosen = damp or _choose_damp(layer, w, centroids, labels, x, x_in, samples, zero, rounds, s_full, sm)
        entry["gptq_damp"] = chosen
    if chosen is None:
        centroids, sm = _nearest_fit(layer, w, centroids, labels, x, x_in, kernel, zero, sm)
    else:
        centroids, labels, sm = _gptq(layer, w, centroids, labels, x, x_in, x_in is x, zero, rounds, chosen, sm)
    return centroids, labels, (sm.reshape(s_full.shape) if sm is not None else s_full)


def _opset_for_tvm(graph: gs.Graph, ctx: Context) -> onnx.ModelProto:
    """Upgrade an opset < 10 model to 10 (onnx.version_converter), so the index trim is a Slice with tensor inputs
    that TVM folds at compile time; the attribute-form Slice of older opsets is not imported by TVM, and the Split
    used instead is not folded (the weights would be rebuilt on every inference). Kept as is, with a note, when
    the model has control-flow subgraphs or the converter fails."""
    before = int(graph.opset or 10)
    if before >= 10:
        return ctx.model
    if has_subgraphs(ctx.model):
        ctx.note(f"opset {before} kept (upgrading would rewrite control-flow subgraphs): TVM rebuilds the "
                 "clustered weights at run time instead of folding them")
        return ctx.model
    try:
        model = upgrade_opset(graph, ctx.model, 10)
    except PassError as exc:
        ctx.note(f"opset {before} kept ({exc}): TVM rebuilds the clustered weights at run time")
        return ctx.model
    ctx.note(f"opset upgraded {before} → 10 with onnx.version_converter (the index rebuild folds in TVM)")
    ctx.details["opset"] = {"from": before, "to": 10}
    return model


def _layer_bits(entries: list[str], layers: list[Layer]) -> dict[str, int]:
    """`["LAYER=B", ...]` → {layer name: bits}; names, op types or fnmatch patterns as `skip` takes them."""
    out: dict[str, int] = {}
    for entry in entries:
        name, sep, value = str(entry).rpartition("=")
        if not sep or not value.strip().isdigit() or not 1 <= int(value) <= 8:
            raise PassError(f"layer_bits entry {entry!r}: expected 'LAYER=B' with B in 1..8")
        try:
            hits, _ = select_layers(layers, [name])
        except PassError as exc:  # say which parameter held the typo
            raise PassError(str(exc).replace(f"skip entry {name!r}", f"layer_bits entry {entry!r}")) from None
        chosen = {l.name for l in layers} - {l.name for l in hits}
        for layer_name in chosen:
            out[layer_name] = int(value)
    return out


def _channel_scales(layer: Layer, w: np.ndarray) -> np.ndarray:
    """Per output channel (along `layer.out_axis`): the RMS of its weights, rounded to float16 as stored, shaped
    to broadcast over `w`. A channel of zeros (or one whose RMS float16 cannot hold) gets 1."""
    axis = layer.out_axis % w.ndim
    moved = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    rms = np.sqrt(np.mean(np.square(moved), axis=1))
    fp16 = np.finfo(np.float16)
    rms = np.where((rms >= float(fp16.tiny)) & (rms <= float(fp16.max)), rms, 1.0)
    shape = [1] * w.ndim
    shape[axis] = -1
    return rms.astype(np.float16).astype(np.float64).reshape(shape)


def _expand(centroids: np.ndarray, labels: np.ndarray, w: np.ndarray, s_full: np.ndarray | None) -> np.ndarray:
    """The weight the codebook rebuilds: centroid of every label, times its channel's scale (when scaled), in the
    rebuild's arithmetic (the centroid values times the float16 scale, in w's type)."""
    shared = centroids[labels].reshape(w.shape)
    if s_full is None:
        return shared
    return (shared.astype(w.dtype) * s_full.astype(w.dtype)).astype(w.dtype)


def _index_bits(count: int) -> int:
    return max(1, int(np.ceil(np.log2(count))))


def cluster(vectors: np.ndarray, size: int, seed: int, weights: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(centroids [K, d], labels [n], zero reserved?) — k-means, index 0 is the zero vector when reserved;
    `weights` (one per vector, optional) weight the k-means objective."""
    from sklearn.cluster import KMeans  # noqa: PLC0415 (heavy import, only when the pass runs)
    is_zero = ~vectors.any(axis=1)
    zero = bool(is_zero.mean() >= ZERO_SHARE) and size > 1
    points = vectors[~is_zero] if zero else vectors
    room = size - 1 if zero else size
    labels = np.zeros(len(vectors), np.int64)
    unique, inverse = np.unique(points, axis=0, return_inverse=True)
    if len(unique) <= room:
        centroids, point_labels = unique, inverse.ravel()
    else:
        if vectors.shape[1] == 1:  # Deep Compression's linear initialisation over [min, max]
            init = np.linspace(points.min(), points.max(), room)[:, None]
        else:
            init = "k-means++"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=room, init=init, n_init=1, max_iter=300, tol=1e-6, random_state=seed)
            sample = None
            if weights is not None:
                sample = weights[~is_zero] if zero else weights
                sample = np.maximum(sample, 1e-12 * max(float(sample.max()), 1e-30))
            with single_threaded():
                point_labels = km.fit_predict(points, sample_weight=sample)
        centroids = km.cluster_centers_
        used = np.unique(point_labels)  # drop empty clusters, renumber
        remap = np.full(room, -1)
        remap[used] = np.arange(len(used))
        centroids, point_labels = centroids[used], remap[point_labels]
    if zero:
        centroids = np.concatenate([np.zeros((1, vectors.shape[1])), centroids])
        labels[~is_zero] = point_labels + 1
    else:
        labels = point_labels.astype(np.int64)
    return centroids, labels, zero


def _input_energy(layer: Layer, w: np.ndarray, x_in: np.ndarray) -> np.ndarray:
    """Per weight: the mean square of the input it multiplies (the diagonal of the layer's input Hessian XᵀX/P),
    the weight's share of the output error per unit of its own error."""
    energy = np.mean(np.square(x_in.astype(np.float64)), axis=1)                   # [G, D]
    per = np.broadcast_to(energy[:, None, :], layer.matrix(w).shape)               # [G, O, D]
    return layer.from_matrix(np.ascontiguousarray(per)).ravel()


GPTQ_DAMPS = (0.01, 0.1, 1.0)  # relative dampings of the layer Hessian tried (GPTQ's percdamp is 0.01)
GPTQ_BLOCK = 128      # columns updated eagerly; the rest get each block's error in one matrix product


def _choose_damp(layer: Layer, w: np.ndarray, centroids: np.ndarray, labels: np.ndarray, x: np.ndarray,
                 x_in: np.ndarray, sample: np.ndarray, zero: bool, rounds: int, s_full: np.ndarray | None = None,
                 sm: np.ndarray | None = None) -> float | None:
    """The Hessian damping for GPTQ, or None for the nearest-centroid assignment, whichever gives the lowest
    output error on the odd calibration samples when fitted on the even ones. With fewer calibration rows than
    inputs (a Gemm sees one row per sample) H is singular, and a lightly damped GPTQ hides the error in
    directions the calibration data never spans; held-out rows show it."""
    fit = sample % 2 == 0
    held = ~fit
    if fit.sum() < 2 or held.sum() < 2:
        return GPTQ_DAMPS[0]
    same = x_in is x
    xf, xif, xh, xih = x[:, fit], x_in[:, fit], x[:, held], x_in[:, held]
    refit, s = _nearest_fit(layer, w, centroids, labels, xf, xif, False, zero, sm)
    best, best_err = None, _output_error(layer, w, _expand(refit, labels, w, _full(s, s_full)), xh, xih)
    for damp in GPTQ_DAMPS:
        c, l, s = _gptq(layer, w, centroids, labels, xf, xif, same, zero, rounds, damp, sm)
        err = _output_error(layer, w, _expand(c, l, w, _full(s, s_full)), xh, xih)
        if err < best_err:
            best, best_err = damp, err
    return best


def _gptq(layer: Layer, w: np.ndarray, centroids: np.ndarray, labels: np.ndarray, x: np.ndarray, x_in: np.ndarray,
          same: bool, zero: bool, rounds: int, damp: float, sm: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`rounds` alternations of GPTQ assignment to the codebook and least-squares refit of the codebook (and of
    the channel scales `sm` [G, O] the codebook is multiplied by, when given): (centroids, labels, scales)."""
    centroids = _refit(layer, w, centroids, labels, x, x_in, False, zero, sm)
    problem = _gptq_problem(layer, w, x, x_in, same, damp)
    for _ in range(rounds):
        labels = _gptq_assign(layer, w, problem, centroids[:, 0], zero, sm)
        centroids, sm = _nearest_fit(layer, w, centroids, labels, x, x_in, False, zero, sm)
    return centroids, labels, sm


def _nearest_fit(layer: Layer, w: np.ndarray, centroids: np.ndarray, labels: np.ndarray, x: np.ndarray,
                 x_in: np.ndarray, kernel: bool, zero: bool, sm: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares centroids for fixed labels; with channel scales, then each channel's scale refitted to the
    least-squares gain of its rebuilt outputs, and the centroids once more (centroids, scales)."""
    centroids = _refit(layer, w, centroids, labels, x, x_in, kernel, zero, sm)
    if sm is None:
        return centroids, None
    sm = _refit_scales(layer, w, centroids, labels, x, x_in, sm)
    return _refit(layer, w, centroids, labels, x, x_in, kernel, zero, sm), sm


def _refit_scales(layer: Layer, w: np.ndarray, centroids: np.ndarray, labels: np.ndarray, x: np.ndarray,
                  x_in: np.ndarray, sm: np.ndarray) -> np.ndarray:
    """Per channel o: the gain s_o = ⟨X̃·q_o, X·w_o⟩ / ‖X̃·q_o‖² that best matches the float outputs with the
    normalised codebook weights q_o, rounded to float16; a channel keeps its scale where that is not a positive
    float16 number."""
    wm = layer.matrix(w).astype(np.float64)
    q = layer.matrix(centroids[labels].reshape(w.shape).astype(np.float64))
    keep = max(1, min(x.shape[1], MAX_Z // max(wm.shape[1], 1)))
    out = sm.copy()
    fp16 = np.finfo(np.float16)
    for g in range(wm.shape[0]):
        a = x_in[g, :keep].astype(np.float64) @ q[g].T                       # [P, O] rebuilt, unit scales
        b = x[g, :keep].astype(np.float64) @ wm[g].T                         # [P, O] float outputs
        den = np.einsum("po,po->o", a, a)
        gain = np.einsum("po,po->o", a, b) / np.where(den > 0, den, 1.0)
        ok = (den > 0) & (gain >= float(fp16.tiny)) & (gain <= float(fp16.max))
        out[g] = np.where(ok, gain, sm[g])
    return out.astype(np.float16).astype(np.float64)


def _full(sm: np.ndarray | None, s_full: np.ndarray | None) -> np.ndarray | None:
    """Row scales [G, O] shaped as the weight-broadcast scales `s_full` (both list the output channels in order)."""
    return None if sm is None else sm.reshape(s_full.shape)


def _gptq_problem(layer: Layer, w: np.ndarray, x: np.ndarray, x_in: np.ndarray, same: bool, damp: float
                  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per group (target weights W* [O, D], upper Cholesky factor U of H⁻¹ in column order, the order).

    H = X̃ᵀX̃/P is the Hessian of the output error ‖X·Wᵀ − X̃·Ŵᵀ‖² in Ŵ; W* = W·XᵀX̃·H⁻¹/P minimises it without
    the codebook, so the error is ‖X̃·(W* − Ŵ)ᵀ‖² plus a constant (W* = W when X̃ = X: nothing before this layer
    is compressed). Columns go in order of decreasing H diagonal ("act order"); inputs that are always zero
    get a unit diagonal (their weights are free and spread no error)."""
    wm = layer.matrix(w).astype(np.float64)
    out = []
    for g in range(wm.shape[0]):
        xt = x_in[g].astype(np.float64)
        h = xt.T @ xt / max(len(xt), 1)
        dead = np.diag(h) <= 0
        h[dead, dead] = 1.0
        h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
        target = wm[g].copy()
        if not same:
            cross = xt.T @ x[g].astype(np.float64) / max(len(xt), 1)          # X̃ᵀX/P
            target = np.linalg.solve(h, cross @ wm[g].T).T
        target[:, dead] = wm[g][:, dead]
        order = np.argsort(-np.diag(h), kind="stable")
        hp = h[np.ix_(order, order)]
        try:
            u = np.linalg.cholesky(np.linalg.inv(hp)).T
        except np.linalg.LinAlgError:
            u = np.diag(1.0 / np.sqrt(np.diag(hp)))                           # no error feedback
        out.append((target[:, order], u, order))
    return out


def _gptq_assign(layer: Layer, w: np.ndarray, problem: list, table: np.ndarray, zero: bool,
                 sm: np.ndarray | None = None) -> np.ndarray:
    """Labels (w's shape, flattened) from GPTQ's column-by-column assignment to the scalar codebook `table`: each
    column takes its nearest centroids, and its error, scaled by the inverse Hessian, is subtracted from the
    columns not yet assigned. With a reserved zero centroid (index 0), weights that are exactly zero stay zero
    and the others choose among the other centroids. With channel scales `sm` [G, O] the targets are divided by
    their row's scale: a row's error is its scale² times the error in codebook units, the same factor for every
    choice in that row, so GPTQ runs on the normalised weights unchanged."""
    wm = layer.matrix(w)
    labels = np.zeros(wm.shape, np.int64)
    first = 1 if zero else 0
    values = table[first:]
    order_c = np.argsort(values, kind="stable")
    ordered = values[order_c]
    mids = (ordered[1:] + ordered[:-1]) / 2
    for g, (target, u, order) in enumerate(problem):
        pruned = (wm[g] == 0)[:, order] if zero else None
        cur = target.copy() if sm is None else target / sm[g][:, None]
        cols = cur.shape[1]
        lab = np.zeros(cur.shape, np.int64)
        for start in range(0, cols, GPTQ_BLOCK):
            end = min(start + GPTQ_BLOCK, cols)
            err = np.zeros((cur.shape[0], end - start))
            for j in range(start, end):
                k = order_c[np.searchsorted(mids, cur[:, j])] + first
                if zero:
                    k = np.where(pruned[:, j], 0, k)
                lab[:, j] = k
                e = (cur[:, j] - table[k]) / u[j, j]
                cur[:, j + 1:end] -= np.outer(e, u[j, j + 1:end])
                err[:, j - start] = e
            cur[:, end:] -= err @ u[start:end, end:]
        labels[g][:, order] = lab
    return layer.from_matrix(labels).ravel()


def _output_error(layer: Layer, w: np.ndarray, shared: np.ndarray, x: np.ndarray, x_in: np.ndarray,
                  bias_delta: np.ndarray | None = None) -> float:
    """Relative L2 error of the layer's outputs: X̃·Ŵᵀ (+ the bias change) against the float X·Wᵀ, on the
    calibration rows (X̃: the inputs of the network compressed up to this layer)."""
    ref = np.einsum("gpd,god->gpo", x, layer.matrix(w).astype(np.float32))
    new = np.einsum("gpd,god->gpo", x_in, layer.matrix(shared).astype(np.float32))
    if bias_delta is not None:
        new = new + layer.output_scale() ** -1 * bias_delta.reshape(new.shape[0], 1, -1)
    return float(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-30))


def _compressed_rows(graph: gs.Graph, ctx: Context, layer: Layer) -> np.ndarray:
    """`layer`'s input rows on the calibration data through the graph as compressed so far, sampled at the same
    positions as the float rows (`calibrate` samples by seed and layer name)."""
    partial = graph.copy()
    partial.cleanup(remove_unused_graph_inputs=False).toposort()
    model = to_model(partial, like=ctx.model)
    return calibrate(model, ctx.calib, [layer], seed=ctx.seed, threads=ctx.threads, rows=CALIB_ROWS,
                     budget=CALIB_BUDGET)[layer.name]


def _refit(layer: Layer, w: np.ndarray, centroids: np.ndarray, labels: np.ndarray, x: np.ndarray,
           x_in: np.ndarray, kernel: bool, zero: bool, sm: np.ndarray | None = None) -> np.ndarray:
    """Least-squares centroids: minimise ‖X·Wᵀ − X̃·Ŵ(c)ᵀ‖² over the calibration rows, ridge towards k-means.

    X are the float network's inputs of the layer, X̃ those of the network compressed so far, so the refit also
    absorbs the error of the layers before. Ŵ(c) is linear in the centroids: every output is Σ_k c_k · (sum of
    the inputs whose weight has label k), so the normal equations are K×K (per-weight) or (K·k²)×(K·k²)
    (kernels, through the inputs' Gram matrices).
    """
    count, dim = centroids.shape
    wm = layer.matrix(w).astype(np.float64)                 # [G, O, D]
    groups, outs, inputs = wm.shape
    if kernel:
        if inputs > MAX_GRAM_INPUTS:
            return centroids
        lab = labels.reshape(groups, outs, inputs // dim)   # kernel labels per (group, output, input channel)
        normal, rhs = _kernel_system(wm, lab, x, x_in, count, dim)
    else:
        lab = layer.matrix(labels.reshape(w.shape))         # [G, O, D]
        normal, rhs = _weight_system(wm, lab, x, x_in, count, sm)
    free = np.arange(count * dim) if not zero else np.arange(dim, count * dim)  # the zero centroid stays 0
    a = normal[np.ix_(free, free)]
    b = rhs[free]
    prior = centroids.ravel()[free]
    ridge = RIDGE * max(np.trace(a) / max(len(free), 1), 1e-30)
    try:
        solved = np.linalg.solve(a + ridge * np.eye(len(free)), b + ridge * prior)
    except np.linalg.LinAlgError:
        return centroids
    out = centroids.ravel().copy()
    out[free] = solved
    return out.reshape(count, dim)


def _weight_system(wm: np.ndarray, lab: np.ndarray, x: np.ndarray, x_in: np.ndarray, count: int,
                   sm: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations for scalar centroids from Z[p, o, k] = s_o · Σ_{d: label[o,d]=k} X̃[p, d] (s_o: the
    channel scale, 1 without), target X·Wᵀ, summed over the groups.

    Up to MAX_GRAM_INPUTS inputs they are formed from the Gram matrices (`_gram_system`: O·D² work), above from
    the design matrix Z itself (`_design_system`: P·O·K², rows subsampled under MAX_Z)."""
    groups, outs, inputs = wm.shape
    scale = np.ones((groups, outs)) if sm is None else sm
    system = _gram_system if inputs <= MAX_GRAM_INPUTS else _design_system
    normal = np.zeros((count, count))
    rhs = np.zeros(count)
    for g in range(groups):
        n, r = system(wm[g], lab[g], x[g], x_in[g], count, scale[g])
        normal += n
        rhs += r
    return normal, rhs


def _gram_system(wm: np.ndarray, lab: np.ndarray, x: np.ndarray, x_in: np.ndarray, count: int, scale: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One group's normal equations from G = X̃ᵀX̃ and X̃ᵀX over all rows: ZᵀZ[k, l] = Σ_o s_o² Σ_{d: label k,
    d': label l} G[d, d'] and Zᵀy[k] = Σ_o s_o Σ_{d: label k} (X̃ᵀX·Wᵀ)[d, o]. `wm`, `lab`: [O, D]; `x`, `x_in`:
    [P, D]; `scale`: [O]."""
    import scipy.sparse  # noqa: PLC0415 (only when the pass runs)
    outs, inputs = wm.shape
    xt = x_in.astype(np.float64)
    gram = xt.T @ xt                                                       # [D, D]
    target = (xt.T @ x.astype(np.float64)) @ wm.T                          # X̃ᵀX·Wᵀ [D, O]
    rhs = np.bincount(lab.ravel(), (scale[:, None] * target.T).ravel(), minlength=count)
    normal = np.zeros((count, count))
    chunk = max(1, MAX_Z // max(count * inputs, 1))                        # outputs per [o·K, D] block
    for o0 in range(0, outs, chunk):
        o1 = min(outs, o0 + chunk)
        n = o1 - o0
        cols = (np.arange(n)[:, None] * count + lab[o0:o1]).ravel()       # (o, label) of each (o, d)
        # per output o: the rows of G summed by label → [o, k, d], scaled by s_o²
        picks = scipy.sparse.csr_matrix((np.ones(n * inputs), (cols, np.tile(np.arange(inputs), n))),
                                        shape=(n * count, inputs))       # [(o, k), d]: label[o, d] = k
        summed = np.asarray(picks @ gram).reshape(n, count, inputs)
        summed *= np.square(scale[o0:o1])[:, None, None]
        # ... then its columns summed by label: Σ_o Σ_{d': label l} summed[o, k, d']
        by_label = scipy.sparse.csr_matrix((np.ones(n * inputs), (np.arange(n * inputs), lab[o0:o1].ravel())),
                                           shape=(n * inputs, count))
        normal += np.asarray(by_label.T @ summed.transpose(0, 2, 1).reshape(n * inputs, count)).T
    return normal, rhs


def _design_system(wm: np.ndarray, lab: np.ndarray, x: np.ndarray, x_in: np.ndarray, count: int,
                   scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One group's normal equations from the design matrix Z [P·O, K] (rows subsampled under MAX_Z)."""
    import scipy.sparse  # noqa: PLC0415 (only when the pass runs)
    outs, inputs = wm.shape
    keep = max(1, min(len(x), MAX_Z // max(outs * count, 1)))
    cols = (np.arange(outs)[:, None] * count + lab).ravel()                # [O·D] column of each weight
    rows = np.tile(np.arange(inputs), outs)
    select = scipy.sparse.csr_matrix((np.ones(cols.size), (rows, cols)), shape=(inputs, outs * count))
    z = np.asarray(x_in[:keep].astype(np.float64) @ select).reshape(keep, outs, count) * scale[None, :, None]
    y = x[:keep].astype(np.float64) @ wm.T                                 # [P, O] float outputs
    flat = z.reshape(-1, count)
    return flat.T @ flat, flat.T @ y.ravel()


def _kernel_system(wm: np.ndarray, lab: np.ndarray, x: np.ndarray, x_in: np.ndarray, count: int, dim: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations for kernel centroids [K, k²] through the Gram matrices X̃ᵀX̃ and X̃ᵀX of each group."""
    groups, outs, inputs = wm.shape
    channels = inputs // dim
    normal = np.zeros((count, dim, count, dim))
    rhs = np.zeros((count, dim))
    for g in range(groups):
        xg = x_in[g].astype(np.float64)
        gram = xg.T @ xg                                                   # [(i,j), (m,n)]
        cross = xg.T @ x[g].astype(np.float64)
        onehot = np.zeros((outs, channels, count))
        onehot[np.arange(outs)[:, None], np.arange(channels)[None, :], lab[g]] = 1.0
        flat = onehot.reshape(outs, channels * count)
        pairs = (flat.T @ flat).reshape(channels, count, channels, count)  # [i, k, m, l]
        g4 = gram.reshape(channels, dim, channels, dim)                   # [i, j, m, n]
        t = pairs.transpose(1, 3, 0, 2).reshape(count * count, channels * channels)
        gg = g4.transpose(0, 2, 1, 3).reshape(channels * channels, dim * dim)
        normal += (t @ gg).reshape(count, count, dim, dim).transpose(0, 2, 1, 3)
        gw = (wm[g] @ cross.T).reshape(outs, channels, dim)               # (X̃ᵀX·W_o) per output
        rhs += np.einsum("oik,oij->kj", onehot, gw)
    return normal.reshape(count * dim, count * dim), rhs.ravel()


def _quantize_codebook(centroids: np.ndarray, bits: int) -> tuple[np.ndarray, int, float]:
    """Uniform asymmetric quantization of the codebook values with an exact zero: (codes, zero point, step)."""
    lo, hi = min(float(centroids.min()), 0.0), max(float(centroids.max()), 0.0)
    levels = (1 << bits) - 1
    step = (hi - lo) / levels if hi > lo else 1.0
    zero_point = int(np.clip(round(-lo / step), 0, levels))
    codes = np.clip(np.round(centroids / step) + zero_point, 0, levels).astype(np.int64)
    return codes, zero_point, float(np.float32(step))


def _bias_delta(layer: Layer, w: np.ndarray, shared: np.ndarray, x: np.ndarray, x_in: np.ndarray) -> np.ndarray:
    """W·E[x] − Ŵ·E[x̃] per output (in output units): the mean output error on the rows given."""
    target = np.einsum("god,gd->go", layer.matrix(w).astype(np.float64), x.astype(np.float64).mean(axis=1))
    got = np.einsum("god,gd->go", layer.matrix(shared).astype(np.float64), x_in.astype(np.float64).mean(axis=1))
    return layer.output_scale() * (target - got).ravel()


def _correct_bias(builder: Builder, layer: Layer, w: np.ndarray, shared: np.ndarray, x: np.ndarray,
                  x_in: np.ndarray, sample: np.ndarray) -> np.ndarray | None:
    """Add the mean output error W·E[x] − Ŵ·E[x̃] on the calibration rows to the bias (Nagel et al., 2019),
    if that helps on held-out samples: fitted on the even calibration samples, it must lower the output error
    on the odd ones (per-channel means from a handful of images overfit, e.g. the 1000 class biases of a
    classifier's last layer), and it needs at least MIN_BIAS_SAMPLES samples. Returns the change, or None when
    the bias is left alone."""
    bias = layer.bias()
    fit = sample % 2 == 0
    if bias is None or len(np.unique(sample)) < MIN_BIAS_SAMPLES:
        return None
    held = ~fit
    trial = _bias_delta(layer, w, shared, x[:, fit], x_in[:, fit])
    with_delta = _output_error(layer, w, shared, x[:, held], x_in[:, held], trial)
    without = _output_error(layer, w, shared, x[:, held], x_in[:, held])
    if with_delta >= without:
        return None
    delta = _bias_delta(layer, w, shared, x, x_in)
    layer.set_bias(builder, bias + delta, w.dtype)
    return delta


def _rebuild(builder: Builder, layer: Layer, labels: np.ndarray, centroids: np.ndarray, codes: np.ndarray | None,
             quant: tuple[int, float, int] | None, kernel: bool, s_full: np.ndarray | None = None) -> gs.Variable:
    """Codebook + packed indices + the ops that rebuild the weight tensor (times the float16 channel scales
    when given); returns the rebuilt tensor."""
    w = layer.values
    name = layer.weight.name
    dtype = w.dtype
    index, _ = builder.indices(labels, _index_bits(len(centroids)), f"{name}_index")
    if codes is not None:
        zero_point, step, code_bits = quant
        raw, _ = builder.indices(codes.ravel(), code_bits, f"{name}_codebook_codes")
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        values = builder.op("Cast", [raw], f"{name}_codebook_values", None, None, to=onnx_type)
        centred = builder.op("Sub", [values, builder.const(f"{name}_codebook_zero", np.array(zero_point, dtype))],
                             f"{name}_codebook_centred", None, None)
        scaled = builder.op("Mul", [centred, builder.const(f"{name}_codebook_step", np.array(step, dtype))],
                            f"{name}_codebook_scaled", None, None)
        table = builder.reshape(scaled, list(centroids.shape), f"{name}_codebook", dtype)
    else:
        table = builder.const(f"{name}_codebook", centroids if kernel else centroids.ravel())
    gathered = builder.op("Gather", [table, index], f"{name}_gathered", None, None, axis=0)
    shaped = builder.reshape(gathered, list(w.shape), f"{name}_shared", dtype)
    return shaped if s_full is None else builder.channel_scale(shaped, s_full.astype(np.float16), name, dtype)


def _report(ctx: Context, per_layer: list[dict], skipped: dict[str, str], unit: str, refit: bool,
            changed: list[str], heads: dict[str, int]) -> None:
    ctx.details["layers"] = changed
    if heads:
        ctx.note("output layer(s) at " + ", ".join(f"{name} {b} bits" for name, b in heads.items())
                 + f" (head_bits; each under {HEAD_SHARE:.0%} of the clustered weights)")
    ctx.details["per_layer"] = per_layer
    ctx.skipped(skipped, "left in float")
    if not per_layer:
        ctx.note("no layer with a float constant weight to cluster")
        return
    kinds = {e["unit"] for e in per_layer}
    if unit == "kernel" and "weight" in kinds:
        ctx.note("layers without k×k kernels (1×1 convs, Gemm, MatMul) use the per-weight codebook")
    text = f"clustered {len(per_layer)} weight tensor(s)"
    if refit:
        errs = [(e["output_rel_err_kmeans"], e["output_rel_err"]) for e in per_layer if "output_rel_err" in e]
        if errs:
            corrected = sum(bool(e.get("bias_corrected")) for e in per_layer)
            text += (f"; least-squares refit (+ bias correction in {corrected} layer(s)): mean output error "
                     f"{np.mean([a for a, _ in errs]):.4f} → {np.mean([b for _, b in errs]):.4f} (relative L2)")
    ctx.note(text)
    if refit and not any(e.get("bias_corrected") for e in per_layer) and len(ctx.calib) < MIN_BIAS_SAMPLES:
        ctx.note(f"bias correction skipped: {len(ctx.calib)} calibration samples (it needs {MIN_BIAS_SAMPLES}; "
                 "per-channel means from fewer overfit)")
