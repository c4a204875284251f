"""`slim`: Network Slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network
Slimming") — rank channels by |γ| of the BatchNormalization in their group and physically remove the smallest.

The paper trains with an L1 penalty on γ so that unimportant channels get γ ≈ 0; most models were not trained
that way, and the pass says so (and still works: compensation then does the repair). It needs the
BatchNormalization nodes, so it must run before `fold-bn`; without any, it notes that and changes nothing.
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import onnx_graphsurgeon as gs

from squeeze.context import Context
from squeeze.registry import Backoff, Range, halve, register_pass

from . import compensate as compensation
from .channel_plan import note_unprunable, plan_removal, summarize_plan
from .channel_space import Group
from .coupling import channel_groups
from .cutting import apply_plan
from .graph_util import constant_value

#: |γ| below this fraction of the largest |γ| counts as "near zero" for the sparsity check.
NEAR_ZERO = 0.01
#: The γ distribution is called sparse when at least this share of channels is near zero.
SPARSE_SHARE = 0.10


def bn_gamma(group: Group) -> np.ndarray | None:
    """Sum over the group's BatchNormalizations of |γ| per channel; None if the group has none."""
    total, found = np.zeros(group.size), False
    for m in group.with_port("param"):
        if m.op != "BatchNormalization":
            continue
        s = m.slot
        gamma = np.abs(constant_value(m.node.inputs[1]).astype(np.float64))
        per_position = gamma.reshape(s.outer, s.width, s.inner).mean(axis=(0, 2))
        total[s.start:s.start + s.length] += per_position[s.offset:s.offset + s.length]
        found = True
    return total if found else None


@register_pass("slim", backoff=Backoff("ratio", halve(0.02)))
def slim(graph: gs.Graph, ctx: Context, *,
         ratio: Annotated[float, Range(0.0, 1.0, hi_open=True),
                          "fraction of the BN-scaled channels to remove (ignored when threshold is set)"] = 0.3,
         threshold: Annotated[float | None, Range(0.0, None),
                              "remove the channels whose |γ| is below this instead of a ratio"] = None,
         scope: Annotated[Literal["global", "layer"],
                          "global: one |γ| ranking over all groups (the paper); layer: `ratio` per group"] = "global",
         multiple: Annotated[int, Range(1, None), "kept channels are a multiple of this (8/16 suit SIMD)"] = 1,
         compensate: Annotated[bool, "refit the next layers by least squares on calibration data"] = True,
         ) -> None:
    """Network Slimming: remove the channels with the smallest BatchNormalization |γ|, then compensate."""
    if not any(n.op == "BatchNormalization" for n in graph.nodes):
        ctx.note("slim: the model has no BatchNormalization, so there is no γ to rank channels by; nothing changed "
                 "(slim must run before fold-bn and quant, which fold them; use prune for BN-free models)")
        return
    groups = channel_groups(graph, ctx.input_shapes)
    note_unprunable(ctx, groups)
    scores: dict[Group, np.ndarray] = {}
    for g in groups:
        gamma = bn_gamma(g)
        if gamma is None or not g.prunable:
            continue
        if g.size <= multiple:
            ctx.note(f"group {g.index} ({g.name}, {g.size} channels) is not larger than multiple={multiple}; kept")
            continue
        scores[g] = gamma
    without = [g for g in groups if g.prunable and bn_gamma(g) is None]
    if without:
        ctx.note(f"{len(without)} prunable group(s) have no BatchNormalization and are left to `prune`: "
                 + ", ".join(g.name for g in without))
    if not scores:
        ctx.note("slim: no prunable channel group has a BatchNormalization; nothing changed")
        return
    gammas = np.concatenate(list(scores.values()))
    near_zero = float(np.mean(gammas < NEAR_ZERO * gammas.max()))
    ctx.details["gamma"] = {"channels": int(gammas.size), "near_zero_share": near_zero,
                            "quantiles": {str(q): float(np.quantile(gammas, q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)}}
    if near_zero < SPARSE_SHARE:
        ctx.note(f"γ is not sparse: only {100 * near_zero:.1f} % of {gammas.size} channels have |γ| below "
                 f"{100 * NEAR_ZERO:g} % of the largest (median |γ| {np.median(gammas):.3g}, max {gammas.max():.3g}); "
                 "the model was likely not trained with an L1 penalty on γ, so |γ| is a weak ranking and the "
                 "removed channels are not idle — compensation repairs what it can")
    if threshold is None and ratio == 0:
        ctx.note("ratio=0: nothing removed")
        return
    plan = plan_removal(scores, ratio, scope, multiple, normalize=False, threshold=threshold)
    ctx.details["groups"] = summarize_plan(ctx, list(scores), plan, scores, ratio, scope, multiple)
    if not plan:
        ctx.note("no channel falls below the threshold" if threshold is not None else
                 f"ratio={ratio:g} removes no channel after rounding to multiples of {multiple}")
        return
    apply_plan(graph, plan)
    if compensate:
        ctx.details["compensation"] = compensation.compensate(graph, ctx, plan)
