"""Which channels to cut, shared by the channel passes: scores → kept channels (`plan_removal`), and the report rows
on what was planned and what could not be pruned. The scores themselves are the passes' (`prune.py`, `slim.py`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .channel_space import Group


def round_keep(size: int, keep: float, multiple: int) -> int:
    """Channels to keep: `keep` rounded to a multiple of `multiple`, at least `multiple`, at most `size`."""
    if multiple <= 1:
        return int(min(size, max(1, round(keep))))
    rounded = int(multiple * round(keep / multiple))
    return int(min(size if size % multiple == 0 else size - size % multiple, max(multiple, rounded)))


def plan_removal(scores: Mapping[Group, np.ndarray], ratio: float, scope: str, multiple: int,
                 normalize: bool = True, threshold: float | None = None) -> dict[Group, np.ndarray]:
    """Kept channels per group: the highest-scoring ones.

    `layer`: every group loses `ratio` of its channels. `global`: the lowest `ratio` of all channels go, ranked
    by score (divided by the group's mean score when `normalize`, so layers of different scale compare).
    `threshold`: channels scoring below it go (overrides `ratio`). Every group keeps at least `multiple`
    channels (at least one), rounded to a multiple of `multiple`; each part of a group that a Split or Slice
    separates keeps at least one channel. Groups that would lose nothing are left out.
    """
    counts: dict[Group, float] = {}
    if threshold is not None:
        counts = {g: float((s >= threshold).sum()) for g, s in scores.items()}
    elif scope == "layer":
        counts = {g: g.size * (1.0 - ratio) for g in scores}
    else:
        pool = []
        for g, s in scores.items():
            mean = float(np.mean(s)) if normalize else 1.0
            pool.append(s / mean if mean > 0 else np.ones_like(s))
        flat = np.concatenate(pool) if pool else np.zeros(0)
        removed = np.zeros(flat.size, bool)
        removed[np.argsort(flat, kind="stable")[:int(round(ratio * flat.size))]] = True
        lo = 0
        for g in scores:
            counts[g] = float(g.size - removed[lo:lo + g.size].sum())
            lo += g.size
    plan = {}
    for g, s in scores.items():
        k = round_keep(g.size, counts[g], multiple)
        if k >= g.size:
            continue
        order = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
        keep = set(order[:k].tolist())
        for lo, hi in g.parts:  # a Split/Slice output must not become empty
            if not any(lo <= c < hi for c in keep):
                best = lo + int(np.argmax(s[lo:hi]))
                worst = min(keep, key=lambda c: s[c])
                keep.discard(worst)
                keep.add(best)
        plan[g] = np.array(sorted(keep), dtype=np.int64)
    return plan


def note_unprunable(ctx, groups: Sequence[Group]) -> None:
    """One note per blocked group (its size, its writers and why), and the same rows in `ctx.details`."""
    rows = []
    for g in groups:
        if g.prunable:
            continue
        rows.append({"group": g.index, "name": g.name, "channels": g.size, "reasons": list(g.reasons)})
        ctx.note(f"group {g.index} ({g.name}, {g.size} channels) not prunable: {'; '.join(g.reasons)}")
    ctx.details["unprunable"] = rows


def summarize_plan(ctx, candidates: Sequence[Group], plan: Mapping[Group, np.ndarray],
                   scores: Mapping[Group, np.ndarray], ratio: float, scope: str, multiple: int) -> list[dict]:
    """Per group: channels before/after, the spread of its scores, MACs its removal saves; notes on rounding."""
    rows = []
    rounded = []
    for g in candidates:
        s = np.asarray(scores[g], dtype=np.float64)
        after = len(plan[g]) if g in plan else g.size
        row = {"group": g.index, "name": g.name, "channels_before": g.size, "channels_after": after,
               "macs_removed": g.macs_removed(g.size - after),
               "score": {"min": float(s.min()), "median": float(np.median(s)), "max": float(s.max()),
                         "cv": float(s.std() / s.mean()) if s.mean() > 0 else 0.0}}
        if g in plan and after < g.size:
            gone = np.setdiff1d(np.arange(g.size), plan[g])
            row["score"]["removed_max"] = float(s[gone].max())
            row["score"]["kept_min"] = float(s[plan[g]].min())
        rows.append(row)
        if scope == "layer" and abs(after - g.size * (1 - ratio)) >= 0.5 and multiple > 1:
            rounded.append(f"{g.name} {after}/{g.size}")
    if rounded:
        ctx.note(f"kept channels rounded to multiples of {multiple}: " + ", ".join(rounded))
    return rows
