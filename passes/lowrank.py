"""`lowrank`: replace a layer by two thin ones whose product approximates it on the calibration activations.

A Conv k×k C→N becomes a k×k C→r conv followed by a 1×1 r→N conv (the *channel* form: Zhang et al., "Accelerating
Very Deep Convolutional Networks for Classification and Detection", TPAMI 2016), or a k×1 C→r conv followed by a
1×k r→N conv (the *spatial* form: Jaderberg et al., "Speeding up Convolutional Neural Networks with Low Rank
Expansions", BMVC 2014, scheme 2; Tai et al., ICLR 2016). A Gemm, or a MatMul with a constant 2-D weight, becomes
two thin ones. The rank r is chosen per layer: `rank` (a fraction of the full rank), `energy` (the smallest r that
keeps that fraction of the layer's output energy on the calibration data) or `layer_rank` (per layer; what a
goal search writes). With `form=auto` both conv forms are fitted at the same MACs and the one with the lower
held-out output loss is kept.

Initialisation fits the activations, not the weights. For a layer y = W·x the rank-r map closest to it on the
calibration inputs, min E‖(W − Ŵ)(x − μ)‖², is Ŵ = U_r·U_rᵀ·W, where U_r holds the top r eigenvectors of the output
covariance W·Σ·Wᵀ = Cov(y) (Σ: the input covariance). This is the same matrix as the SVD of W·Σ^{1/2} truncated and
mapped back with Σ^{-1/2} (the "W·Σ^{1/2}" form of ASVD / SVD-LLM), but it is computed from the outputs alone: an
N×N eigenproblem on the sampled output rows, with no D×D input covariance to build, no square root and no inverse
of a Σ that is singular whenever a ReLU leaves a channel dead or the layer has more inputs than calibration rows
(mnist_burn's fc1 reads 11 616 features from 256 images). The first factor is U_rᵀ·W, the second U_r, and the
bias (always on the second factor) takes the mean error. For the spatial form the same is done with the weight
laid out as [(N, kw), (C, kh)] and the k×1 input columns of every window as x (the cross terms between columns are
left to the refit). `init=weight` gives the plain SVD of W (data-free), for comparison.

Then the second factor and the bias are refit by least squares like pruning's compensation
(`compensate.refit`: ridge toward the initial factor, ReLU-aware when a ReLU follows, chosen on held-out
calibration images), on the first factor's outputs in the network compressed so far, against the original
network's outputs; layer by layer in graph order, so every refit also absorbs the error of the layers before it.
Last, the layers after the implants that are left as they are (skipped, too small a share, depthwise, the
classifier) are refit the same way, as pruning's compensation refits the layers downstream of a cut
(`compensate.compensate(changed=…)`): on cifar10_resnet4b's `--goal macs=0.65` plan, which leaves four layers
unfactorized, this lowers the KL divergence from the original on unseen images from 0.0185 to 0.0125.

Grouped and depthwise convolutions (each group is already thin), and layers whose factorisation has as many MACs
or parameters as the original, are left as they are with the reason in a note. Deterministic: rows are sampled by
seed and layer name, the linear algebra runs on one BLAS thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from squeeze import metrics
from squeeze.context import Context
from squeeze.data import HOLDOUT_EVERY, holdout
from squeeze.errors import PassError
from squeeze.model import to_model
from squeeze.registry import Backoff, Range, register_pass
from squeeze.threads import single_threaded

from .channel_plan import round_keep
from .graph_util import infer_shapes, put_input
from .im2col import auto_pad, fixed_pads
from . import compensate as compensation
from .compensate import PostOp, post_op, refit
from .weights import Builder, Layer, calibrate, find_layers, select_layers

ROWS = 8192            # sampled input rows (im2col windows for a conv) per layer
BUDGET = 16_000_000    # floats per layer's sampled rows (fewer rows for layers with very many inputs)
MIN_SHARE = 0.01       # layers with a smaller share of the model's MACs are left alone by default
RANK_CEILING = 0.95    # the accuracy guard raises `rank` up to this fraction, then gives up


def weaker_rank(value: float) -> float | None:
    """The accuracy guard's next, weaker `rank`: halfway to full rank (0.25 → 0.625 → 0.8125 → 0.906), None past
    RANK_CEILING (by then few layers gain anything from a factorisation)."""
    nxt = round(1.0 - (1.0 - value) / 2.0, 4)
    return nxt if nxt <= RANK_CEILING and nxt > value else None


@register_pass("lowrank", backoff=Backoff("rank", weaker_rank, skip="skip"))
def lowrank(graph: gs.Graph, ctx: Context, *,
            rank: Annotated[float, Range(0.0, 1.0, lo_open=True), "kept rank as a fraction of each layer's full "
                            "rank min(inputs, outputs) (rounded up)"] = 0.5,
            energy: Annotated[float, Range(0.0, 1.0, hi_open=True), "when > 0: per layer, the smallest rank that "
                              "keeps this fraction of the output energy on the calibration data (instead of "
                              "`rank`)"] = 0.0,
            layer_rank: Annotated[list[str], "per-layer ranks 'LAYER=R' (node name or pattern; R an integer rank, "
                                  "or a fraction like 0.25); other layers use `rank`/`energy` (what --goal "
                                  "writes)"] = [],  # noqa: B006 (never mutated)
            form: Annotated[Literal["auto", "channel", "spatial"], "conv factorisation: k×k C→r then 1×1 r→N "
                            "(channel), k×1 C→r then 1×k r→N (spatial), or whichever fits the calibration data "
                            "better at the same MACs (auto)"] = "auto",
            init: Annotated[Literal["activation", "weight"], "initial factors from the output covariance on the "
                            "calibration data (activation), or the plain SVD of the weight"] = "activation",
            compensate: Annotated[bool, "refit the second factor and the bias by least squares on the calibration "
                                  "activations"] = True,
            min_share: Annotated[float, Range(0.0, 1.0), "layers with less than this share of the model's MACs "
                                 "are left as they are (little to gain; a classifier's last layer loses most from "
                                 "a rank cut); 0 considers every layer"] = MIN_SHARE,
            skip: Annotated[list[str], "layers left as they are: node names, op types, patterns, first, last"]
            = [],  # noqa: B006 (never mutated)
            multiple: Annotated[int, Range(1, None), "ranks rounded to a multiple of this (a target's channel block, "
                                "8/16 suit SIMD: the first factor's outputs fill whole vectors); 1: as chosen"] = 1,
            ) -> None:
    """Low-rank implants: factorize Conv/Gemm/MatMul layers into two thin ones fitted to calibration activations."""
    all_layers = find_layers(graph)
    ranks = parse_layer_ranks(layer_rank, all_layers)
    specs, skipped = candidate_specs(graph, ctx, all_layers, skip, ranks, min_share)
    data_aware = not ctx.calib_is_synthetic and ctx.model is not None
    if ctx.calib_is_synthetic and (init == "activation" or compensate):
        ctx.note("activation-aware init and refit skipped: the calibration data is synthetic noise; plain weight "
                 "SVD used (pass --calib with real inputs)")
    rows, samples = _rows(ctx.model, ctx, [s.layer for s in specs]) if data_aware and specs else ({}, {})
    builder = Builder(graph)
    per_layer: list[dict] = []
    changed: list[gs.Node] = []
    with single_threaded("blas"):
        for spec in specs:
            name = spec.layer.name
            x = rows.get(name)
            # The inputs this layer really sees: those of the network factorized so far (same sampled positions).
            x_in = _rows(_current(graph, ctx), ctx, [spec.layer])[0][name] if x is not None and per_layer else x
            fits, why = _fit_layer(spec, x, x_in, samples.get(name), ranks.get(name, rank),
                                   0.0 if name in ranks else energy, form, init if x is not None else "weight",
                                   compensate and x is not None, multiple)
            if not fits:
                skipped[name] = why
                continue
            best = min(fits, key=lambda f: f.loss)
            changed += _rewrite(builder, spec, best)
            per_layer.append(best.entry(spec, fits))
    _report(ctx, per_layer, skipped)
    if changed and data_aware and compensate:
        compensation.compensate(graph, ctx, {}, changed=changed)


def candidate_specs(graph: gs.Graph, ctx: Context, layers: list[Layer], skip: list[str], ranks: dict,
                min_share: float) -> tuple[list["_LayerSpec"], dict[str, str]]:
    """The layers to try, in graph order, and {layer: why not} for the others (skip list, unsupported form, too
    small a share of the model's MACs unless `layer_rank` names it)."""
    chosen, skipped = select_layers(layers, skip)
    shapes = infer_shapes(graph, ctx.input_shapes)
    specs = []
    for layer in chosen:
        why = unsupported(layer)
        if why:
            skipped[layer.name] = why
        else:
            specs.append(_LayerSpec.of(layer, shapes))
    total = max(sum(spec.macs() for spec in specs), _model_macs(ctx), 1)
    kept = []
    for spec in specs:
        share = spec.macs() / total
        if share < min_share and spec.layer.name not in ranks:
            skipped[spec.layer.name] = f"{100 * share:.2g} % of the model's MACs < min_share={min_share:g}"
        else:
            kept.append(spec)
    return kept, skipped


def candidate_layers(graph: gs.Graph, ctx: Context, min_share: float | None = None) -> list[str]:
    """The layers `lowrank` would factorize with its defaults (what a goal search measures), in graph order."""
    share = MIN_SHARE if min_share is None else min_share
    specs, _ = candidate_specs(graph, ctx, find_layers(graph), [], {}, share)
    return [s.layer.name for s in specs]


# ---------------------------------------------------------------------------------------------- parameters


def parse_layer_ranks(entries: list[str], layers: list[Layer]) -> dict[str, float | int]:
    """`["LAYER=R", ...]` → {layer name: R}: an int is an absolute rank, a float in (0, 1] a fraction of full rank.
    LAYER is a node name, op type or fnmatch pattern as `skip` takes it; a typo is a PassError naming the layers."""
    out: dict[str, float | int] = {}
    for entry in entries:
        name, sep, text = str(entry).rpartition("=")
        value = _rank_value(text.strip()) if sep else None
        if value is None:
            raise PassError(f"layer_rank entry {entry!r}: expected 'LAYER=R' with R a rank ≥ 1 or a fraction in "
                            "(0, 1]")
        try:
            _, hits = select_layers(layers, [name])
        except PassError as exc:  # say which parameter held the typo
            raise PassError(str(exc).replace(f"skip entry {name!r}", f"layer_rank entry {entry!r}")) from None
        for layer_name in hits:
            out[layer_name] = value
    return out


def _rank_value(text: str) -> float | int | None:
    if text.isdigit():
        return int(text) if int(text) >= 1 else None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 < value <= 1.0 else None


def _model_macs(ctx: Context) -> int:
    """The MACs of the model the pass starts from (0 when unknown)."""
    if ctx.model is None:
        return 0
    try:
        return int(metrics.summary(ctx.model, ctx.input_shapes)["macs"])
    except Exception:  # noqa: BLE001 (best effort: the layers' own MACs are the fallback)
        return 0


def unsupported(layer: Layer) -> str | None:
    """Why `layer` cannot be factorized (None when it can)."""
    if layer.values is None:
        return "its weight is computed, not a float constant (already compressed?)"
    if not np.isfinite(layer.values).all():
        return "its weight holds NaN or inf"
    if layer.op == "ConvTranspose":
        return "ConvTranspose is not factorized"
    if layer.groups > 1:
        kind = "depthwise" if layer.groups == layer.out_count else "grouped"
        return f"{kind} conv (group={layer.groups}): each group is already thin"
    if layer.op == "Gemm" and layer.node.attrs.get("transA", 0):
        return "Gemm with transA"
    if not layer.has_matrix:
        return ("not a 2-D convolution" if layer.op == "Conv"
                else "its weight is not a constant 2-D right-hand matrix")
    return None


# ---------------------------------------------------------------------------------------------- calibration


def _rows(model: onnx.ModelProto, ctx: Context, layers: list[Layer]):
    """Sampled input rows {layer: [P, D] float32} and {layer: calibration sample of each row}, at positions that
    depend only on the seed, the layer name and the data (so the factorized network is read at the same ones)."""
    rows, samples = calibrate(model, ctx.calib, layers, rows=ROWS, budget=BUDGET, seed=ctx.seed,
                              threads=ctx.threads, with_samples=True)
    return {k: v[0] for k, v in rows.items()}, samples


def _current(graph: gs.Graph, ctx: Context) -> onnx.ModelProto:
    partial = graph.copy()
    partial.cleanup(remove_unused_graph_inputs=False).toposort()
    return to_model(partial, like=ctx.model)


# ---------------------------------------------------------------------------------------------- one layer


@dataclass
class _LayerSpec:
    """A layer as y = W·x + b over rows: W [N, D] (Gemm's alpha folded in), b per output or None when the bias
    cannot be changed (a Gemm whose C is not one value per output), and its conv geometry."""

    layer: Layer
    w: np.ndarray                      # [N, D] float64
    b: np.ndarray | None               # [N] float64
    post: PostOp
    kernel: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None
    positions: int = 1                 # output rows per sample (output pixels, MatMul's leading dims)

    @classmethod
    def of(cls, layer: Layer, shapes: dict) -> "_LayerSpec":
        w = layer.matrix(layer.values)[0].astype(np.float64) * layer.output_scale()
        spec = cls(layer, w, layer.bias(), post_op(layer.node.outputs[0]))  # bias(): Gemm's beta·C
        out = shapes.get(layer.node.outputs[0].name)
        if layer.op == "Conv":
            spec.kernel = tuple(int(k) for k in layer.shape[2:])
            given = shapes.get(layer.input.name)
            if given is not None and len(given) == 4 and all(isinstance(d, int) for d in given[2:]):
                spec.in_hw = (int(given[2]), int(given[3]))
            if out is not None and len(out) == 4 and all(isinstance(d, int) for d in out[2:]):
                spec.out_hw = (int(out[2]), int(out[3]))
                spec.positions = spec.out_hw[0] * spec.out_hw[1]
        elif out is not None and len(out) > 1 and all(isinstance(d, int) for d in out[1:-1]):
            spec.positions = int(np.prod(out[1:-1])) if layer.op == "MatMul" else 1
        return spec

    @property
    def channels(self) -> int:
        return self.w.shape[1] // (self.kernel[0] * self.kernel[1])

    def macs(self) -> int:
        return self.positions * self.w.shape[0] * self.w.shape[1]

    def params(self) -> int:
        return int(self.w.size)

    def spatial_problem(self) -> str | None:
        """Why the k×1 / 1×k form does not apply (None when it does)."""
        if self.layer.op != "Conv":
            return "not a conv"
        if self.kernel[0] == 1 or self.kernel[1] == 1:
            return "the kernel is already one-dimensional"
        if fixed_pads(self.layer.node, 2) is None:
            return f"auto_pad={auto_pad(self.layer.node)}"
        if self.in_hw is None or self.out_hw is None:
            return "its spatial shape is unknown"
        return None


@dataclass
class _Fit:
    """One factorisation of a layer: first factor [r·…] and second factor S [N, q] with bias, and its cost."""

    form: str                          # "channel" | "spatial"
    rank: int
    full: int
    first: np.ndarray                  # channel: [r, D]; spatial: [r, C·kh]
    second: np.ndarray                 # [N, q]: q = r (channel) or r·kw (spatial), columns in (r, j) order
    bias: np.ndarray | None
    macs: int
    params: int
    loss: float                        # held-out loss after the next nonlinearity (relative), or weight error
    info: dict = field(default_factory=dict)

    def entry(self, spec: _LayerSpec, fits: list["_Fit"]) -> dict:
        row = {"layer": spec.layer.name, "op": spec.layer.op, "form": self.form, "rank": self.rank,
               "full_rank": self.full, "macs": [spec.macs(), self.macs], "params": [spec.params(), self.params],
               **self.info}
        if len(fits) > 1:
            row["loss_by_form"] = {f.form: round(f.loss, 6) for f in fits}
        return row


def _fit_layer(spec: _LayerSpec, x: np.ndarray | None, x_in: np.ndarray | None, sample: np.ndarray | None,
               wanted: float | int, energy: float, form: str, init: str, do_refit: bool, multiple: int = 1
               ) -> tuple[list[_Fit], str]:
    """The factorisations of `spec` worth making (empty, with the reason, when none saves MACs and parameters)."""
    split = _Split.of(x, x_in, sample, spec) if x is not None else None
    forms = ["channel", "spatial"] if spec.layer.op == "Conv" and form == "auto" else \
        ["spatial" if form == "spatial" and spec.layer.op == "Conv" else "channel"]
    if "spatial" in forms and spec.spatial_problem():
        if form == "spatial":
            return [], f"the spatial form does not apply: {spec.spatial_problem()}"
        forms.remove("spatial")
    fits, reasons = [], []
    budget = None
    for kind in forms:
        problem = _Problem.of(spec, kind, split)
        basis, energies = problem.basis(init)
        if kind == "spatial" and budget is not None:
            r = problem.largest_rank_within(budget)
        else:
            r = _choose_rank(wanted, energy, energies, problem.full)
        if multiple > 1:  # nearest multiple (within the budget: the multiple below)
            r = r - r % multiple if kind == "spatial" and budget is not None else round_keep(problem.full, r, multiple)
        macs, params = problem.cost(r) if r >= 1 else (spec.macs(), spec.params())
        if r < 1 or r >= problem.full or macs >= spec.macs() or params >= spec.params():
            reasons.append(f"{kind} form at rank {max(r, 1)}/{problem.full} has {_ratio(macs, spec.macs())} the "
                           f"MACs and {_ratio(params, spec.params())} the parameters: no gain")
            continue
        if budget is None:
            budget = macs
        fits.append(problem.fit(r, basis, init, do_refit, macs, params))
    return fits, "; ".join(reasons)


def _ratio(a: int, b: int) -> str:
    return f"{a / max(b, 1):.2f}×"


def _choose_rank(wanted: float | int, energy: float, energies: np.ndarray, full: int) -> int:
    if isinstance(wanted, int):
        return min(wanted, full)
    if energy > 0 and energies.sum() > 0:
        kept = np.cumsum(energies) / energies.sum()
        return int(min(np.searchsorted(kept, energy - 1e-12) + 1, full))
    return int(min(np.ceil(wanted * full - 1e-9), full))


@dataclass
class _Split:
    """The calibration rows of one layer, split into fitting rows and held-out rows (by calibration sample)."""

    x: np.ndarray          # float network's inputs [P, D]
    x_in: np.ndarray       # factorized network's inputs at the same positions [P, D]
    y: np.ndarray          # float network's outputs W·x + b [P, N]
    held: np.ndarray       # [P] bool

    @classmethod
    def of(cls, x, x_in, sample, spec: _LayerSpec) -> "_Split":
        y = x.astype(np.float64) @ spec.w.T + (spec.b if spec.b is not None else 0.0)
        held = holdout(int(sample.max()) + 1)[sample] if len(np.unique(sample)) >= 2 * HOLDOUT_EVERY \
            else np.zeros(len(x), bool)
        return cls(x, x_in, y, held)

    @property
    def fit_rows(self) -> np.ndarray:
        return ~self.held

    @property
    def check_rows(self) -> np.ndarray:
        return self.held if self.held.any() else ~self.held


@dataclass
class _Problem:
    """A factorisation form of one layer as a matrix problem: M [R, K] maps the vectors v (K: the whole window for
    the channel form, one k×1 column for the spatial form) to R partial outputs; a rank-r basis U_r of the R side
    gives the first factor U_rᵀ·M and the initial second factor U_r."""

    spec: _LayerSpec
    kind: str
    m: np.ndarray                      # [R, K]
    split: _Split | None

    @classmethod
    def of(cls, spec: _LayerSpec, kind: str, split: _Split | None) -> "_Problem":
        if kind == "channel":
            return cls(spec, kind, spec.w, split)
        n = spec.w.shape[0]
        kh, kw = spec.kernel
        w4 = spec.w.reshape(n, spec.channels, kh, kw)
        return cls(spec, kind, w4.transpose(0, 3, 1, 2).reshape(n * kw, spec.channels * kh), split)

    @property
    def full(self) -> int:
        return int(min(self.m.shape))

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """The input vectors of M from window rows [P, D]: the rows themselves, or their k×1 columns [P·kw, C·kh]."""
        if self.kind == "channel":
            return rows
        kh, kw = self.spec.kernel
        return rows.reshape(len(rows), self.spec.channels, kh, kw).transpose(0, 3, 1, 2).reshape(-1, self.m.shape[1])

    def basis(self, init: str) -> tuple[np.ndarray, np.ndarray]:
        """(U [R, R] columns by decreasing energy, energies): eigenvectors of the output covariance M·Cov(v)·Mᵀ on
        the fitting rows (activation), or the left singular vectors of M (weight)."""
        if init == "activation" and self.split is not None:
            v = self._vectors(self.split.x[self.split.fit_rows]).astype(np.float64)
            out = v @ self.m.T
            out -= out.mean(axis=0) if self.centred else 0.0
            energies, u = np.linalg.eigh(out.T @ out)
            order = np.argsort(-energies, kind="stable")
            return _signed(u[:, order]), np.maximum(energies[order], 0.0)
        u, s, _ = np.linalg.svd(self.m, full_matrices=False)
        return _signed(u), s ** 2

    @property
    def centred(self) -> bool:
        """Fit the covariance about the mean when the bias can take the mean (always for a conv)."""
        return self.spec.b is not None

    def cost(self, r: int) -> tuple[int, int]:
        """(MACs per sample, weight parameters) of the factorisation at rank r."""
        spec = self.spec
        n, d = spec.w.shape
        if self.kind == "channel":
            return spec.positions * r * (d + n), r * (d + n)
        kh, kw = spec.kernel
        c = spec.channels
        (oh, ow), (_, iw) = spec.out_hw, spec.in_hw
        return r * (c * kh * oh * iw + n * kw * oh * ow), r * (c * kh + n * kw)

    def largest_rank_within(self, macs: int) -> int:
        r = 0
        while r + 1 <= self.full and self.cost(r + 1)[0] <= macs:
            r += 1
        return r

    def fit(self, r: int, basis: np.ndarray, init: str, do_refit: bool, macs: int, params: int) -> _Fit:
        """Factors at rank r from the basis; then (data-aware) the bias takes the mean error and, with `do_refit`,
        the second factor and the bias are refit by least squares on the factorized network's rows."""
        u = basis[:, :r]
        first = u.T @ self.m                                     # [r, K]
        second = self._second(u)                                 # [N, q]
        spec, split = self.spec, self.split
        bias = spec.b.copy() if spec.b is not None else None
        if split is None:
            ref = spec.w
            err = float(np.linalg.norm(self.dense(first, second) - ref) / max(np.linalg.norm(ref), 1e-30))
            return _Fit(self.kind, r, self.full, first, second, bias, macs, params, err,
                        {"weight_rel_err": err})
        z = self._inner(split.x_in, first)                       # [P, q] first factor's outputs
        fit_rows, check = split.fit_rows, split.check_rows
        if bias is not None and init == "activation":
            bias = bias + (split.y[fit_rows] - z[fit_rows] @ second.T - bias).mean(axis=0)
        info = {"init": init, "output_rel_err_init": _rel_err(z, second, bias, split.y)}
        loss = _loss(z[check], second, bias, split.y[check], spec.post)
        if do_refit:
            zt, yt = z[fit_rows].astype(np.float32), split.y[fit_rows]
            zh, yh = (z[check].astype(np.float32), split.y[check]) if split.held.any() else (zt, yt)
            new_w, new_b, how = refit(zt, yt, zh, yh, second.T.copy(), bias, spec.post, True)
            second, bias = new_w.T, new_b
            info["refit"] = how["method"]
            loss = how["loss_after"]
        info["output_rel_err"] = _rel_err(z, second, bias, split.y)
        info["held_out_loss"] = loss
        return _Fit(self.kind, r, self.full, first, second, bias, macs, params, float(loss), info)

    def _second(self, u: np.ndarray) -> np.ndarray:
        if self.kind == "channel":
            return u
        n, kw, r = self.spec.w.shape[0], self.spec.kernel[1], u.shape[1]
        return u.reshape(n, kw, r).transpose(0, 2, 1).reshape(n, r * kw)

    def _inner(self, rows: np.ndarray, first: np.ndarray) -> np.ndarray:
        """The first factor's outputs that the second factor reads at each sampled output position: [P, q]. For
        the spatial form, column j of the window through the k×1 conv; exact at borders too (zero padding in, zero
        out: the first factor has no bias)."""
        if self.kind == "channel":
            return rows.astype(np.float64) @ first.T
        kh, kw = self.spec.kernel
        r = first.shape[0]
        windows = rows.reshape(len(rows), self.spec.channels, kh, kw).astype(np.float64)
        return np.einsum("pcij,rci->prj", windows, first.reshape(r, self.spec.channels, kh),
                         optimize=True).reshape(len(rows), r * kw)

    def dense(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """The [N, D] weight the two factors make together."""
        if self.kind == "channel":
            return second @ first
        n = self.spec.w.shape[0]
        kh, kw = self.spec.kernel
        r = first.shape[0]
        w4 = np.einsum("nrj,rci->ncij", second.reshape(n, r, kw), first.reshape(r, self.spec.channels, kh))
        return w4.reshape(n, -1)


def _signed(u: np.ndarray) -> np.ndarray:
    """Basis vectors with their largest entry positive: eigen/SVD signs are arbitrary, bytes must not be."""
    peak = np.argmax(np.abs(u), axis=0)
    return u * np.where(u[peak, np.arange(u.shape[1])] < 0, -1.0, 1.0)


def _rel_err(z: np.ndarray, second: np.ndarray, bias: np.ndarray | None, y: np.ndarray) -> float:
    pred = z @ second.T + (bias if bias is not None else 0.0)
    return float(np.linalg.norm(pred - y) / max(np.linalg.norm(y), 1e-30))


def _loss(z: np.ndarray, second: np.ndarray, bias: np.ndarray | None, y: np.ndarray, post: PostOp) -> float:
    """Relative squared error after the layer's next nonlinearity (the measure `compensate.refit` chooses by)."""
    target = post(y)
    pred = post(z @ second.T + (bias if bias is not None else 0.0))
    return float(((pred - target) ** 2).sum() / max(float((target ** 2).sum()), 1e-30))


# ---------------------------------------------------------------------------------------------- rewrite


def _rewrite(builder: Builder, spec: _LayerSpec, fit: _Fit) -> list[gs.Node]:
    """Insert the first factor before the node and turn the node itself into the second factor (same name, same
    output, the bias on it), so what reads the layer's output is untouched."""
    layer, node = spec.layer, spec.layer.node
    dtype = layer.values.dtype
    name = layer.name
    r = fit.rank
    n = spec.w.shape[0]
    if layer.op == "Conv":
        kh, kw = spec.kernel
        attrs = {k: v for k, v in node.attrs.items() if k != "group"}
        if fit.form == "channel":
            first_w = fit.first.reshape(r, spec.channels, kh, kw)
            second_w = fit.second.reshape(n, r, 1, 1)
            second_attrs = {"kernel_shape": [1, 1]}
        else:
            strides = list(attrs.get("strides", [1, 1]))
            dil = list(attrs.get("dilations", [1, 1]))
            pads = fixed_pads(layer.node, 2)
            attrs.pop("auto_pad", None)
            first_w = fit.first.reshape(r, spec.channels, kh, 1)
            attrs.update(kernel_shape=[kh, 1], strides=[strides[0], 1], dilations=[dil[0], 1],
                         pads=[pads[0], 0, pads[2], 0])
            second_w = fit.second.reshape(n, r, kw)[:, :, None, :]
            second_attrs = {"kernel_shape": [1, kw], "strides": [1, strides[1]], "dilations": [1, dil[1]],
                            "pads": [0, pads[1], 0, pads[3]]}
        mid = builder.op("Conv", [layer.input, builder.const(f"{name}_lowrank_weight", first_w.astype(dtype))],
                         f"{name}_lowrank", dtype, None, **attrs)
        node.attrs.clear()
        node.attrs.update(second_attrs)
        bias = fit.bias if fit.bias is not None else np.zeros(n)
        node.inputs[0] = mid
        node.inputs[1] = builder.const(f"{name}_lowrank_out_weight", second_w.astype(dtype))
        put_input(node, 2, builder.const(f"{name}_lowrank_bias", bias.astype(dtype)))
        return [mid.inputs[0], node]
    # the first factor of a Gemm or MatMul: x[..., D] · A[D, r] (a MatMul: Gemm needs a C input before opset 11)
    mid = builder.op("MatMul", [layer.input, builder.const(f"{name}_lowrank_weight",
                                                          np.ascontiguousarray(fit.first.T).astype(dtype))],
                     f"{name}_lowrank", dtype, None)
    node.inputs[0] = mid
    if layer.op == "Gemm":
        node.inputs[1] = builder.const(f"{name}_lowrank_out_weight", fit.second.astype(dtype))
        node.attrs["transB"], node.attrs["alpha"] = 1, 1.0
        if fit.bias is not None:
            node.attrs["beta"] = 1.0
            put_input(node, 2, builder.const(f"{name}_lowrank_bias", fit.bias.astype(dtype)))
        return [mid.inputs[0], node]
    node.inputs[1] = builder.const(f"{name}_lowrank_out_weight", np.ascontiguousarray(fit.second.T).astype(dtype))
    return [mid.inputs[0], node]


# ---------------------------------------------------------------------------------------------- report


def _report(ctx: Context, per_layer: list[dict], skipped: dict[str, str]) -> None:
    ctx.details["layers"] = [e["layer"] for e in per_layer]
    ctx.details["per_layer"] = per_layer
    ctx.skipped(skipped, "left as they are")
    if not per_layer:
        ctx.note("no layer factorized")
        return
    before = sum(e["macs"][0] for e in per_layer)
    after = sum(e["macs"][1] for e in per_layer)
    text = (f"factorized {len(per_layer)} layer(s): " + ", ".join(
        f"{e['layer']} {e['form']} r={e['rank']}/{e['full_rank']}" for e in per_layer)
        + f"; their MACs {before:,} → {after:,} ({after / max(before, 1):.2f}×)")
    errs = [(e["output_rel_err_init"], e["output_rel_err"]) for e in per_layer if "output_rel_err" in e]
    if errs:
        text += (f"; mean output error {np.mean([a for a, _ in errs]):.4f} (init) → "
                 f"{np.mean([b for _, b in errs]):.4f} (relative L2 on calibration rows)")
    ctx.note(text)
