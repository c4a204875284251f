"""`blockperm`'s compensation: the kept blocks are refit so the layer's output on calibration activations (from
the network as rewritten so far) matches the original — no change, a free scale per output, or that scale plus a
ridge correction toward the kept weights, chosen on held-out images after the next nonlinearity. Also the
calibration activations the pass reads (`calib_values`, `samples_first`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from squeeze import runtime
from squeeze.context import Context
from squeeze.data import Dataset, holdout
from squeeze.model import to_model

from .compensate import conv_rows, post_op
from .im2col import conv_windows
from .ridge import Ridge

if TYPE_CHECKING:
    from .blockperm import BlockLayer


ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


MAX_ROWS = 16384


ROW_FLOATS = 25_000_000  # at most this many input values are kept per layer (rows are subsampled to fit)


def samples_first(value: np.ndarray, rank: int) -> np.ndarray:
    """An activation over calibration samples in the tensor's own rank (samples merged into the batch axis)."""
    return value.reshape((-1,) + value.shape[2:]) if value.ndim > rank else value


def calib_values(model, data: Dataset, names: list[str], threads: int | None = None) -> dict[str, np.ndarray]:
    """Values of tensors on `data` (graph inputs straight from the data, the rest run by ONNX Runtime)."""
    inputs = {i.name for i in model.graph.input}
    out = {n: data.arrays[n] for n in names if n in inputs}
    rest = [n for n in names if n not in inputs]
    if rest:
        out.update(runtime.activations(model, data, rest, threads=threads))
    return out


def export(graph: gs.Graph, ctx: Context):
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return to_model(graph, like=ctx.model)


def compensate_blocks(graph: gs.Graph, ctx: Context, t: BlockLayer, reference, done: list[BlockLayer],
                      blocks: np.ndarray, bias: np.ndarray, pin: np.ndarray, pout: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Refit the blocks so the layer's output on calibration inputs (from the network as rewritten so far)
    matches the original output: choose among no change, scale only and ridge strengths on held-out images."""
    current = export(graph, ctx) if any(_upstream(d, t) for d in done) else reference
    x = samples_first(calib_values(current, ctx.calib, [t.x.name], ctx.threads)[t.x.name], t.rank)
    y = samples_first(calib_values(reference, ctx.calib, [t.y.name], ctx.threads)[t.y.name], t.rank)
    rng = np.random.default_rng(ctx.seed)
    rows_x, rows_y, sample = _rows(t, x, y, rng)
    if not (np.isfinite(rows_x).all() and np.isfinite(rows_y).all()):
        return blocks, bias, {"method": "none", "why": "non-finite calibration activations"}
    held = holdout(len(x))[sample]  # every 4th calibration sample; else every 4th row (a few samples' windows)
    if held.all() or not held.any():
        held = holdout(len(sample))
    if held.all() or not held.any():  # e.g. a Gemm with fewer calibration samples than HOLDOUT_EVERY
        return blocks, bias, {"method": "none", "rows": int(len(rows_x)),
                              "why": f"{len(rows_x)} calibration rows: too few to fit on some and check on others"}
    post = post_op(t.y)
    B = t.blocks

    def block_x(rows: np.ndarray, g: int) -> np.ndarray:
        valid = pin[g][pin[g] >= 0]
        return rows[:, valid].reshape(len(rows), -1).astype(np.float64)

    def predict(ws: list[np.ndarray], bs_: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        pred = np.zeros((len(rows), t.m))
        for g in range(B):
            ro = pout[g] >= 0
            pred[:, pout[g][ro]] = block_x(rows, g) @ ws[g] + bs_[g]
        return pred

    w0, b0 = [], []
    for g in range(B):
        ri, ro = pin[g] >= 0, pout[g] >= 0
        w0.append(blocks[g][np.ix_(ro, ri)].reshape(ro.sum(), -1).T)  # [inputs·kernel, outputs]
        b0.append(bias[g][ro])
    train, test = ~held, held
    target = post(rows_y[test])
    denom = max(float((target ** 2).sum()), 1e-30)

    def loss(ws, bs_) -> float:
        return float(((post(predict(ws, bs_, rows_x[test])) - target) ** 2).sum()) / denom

    candidates = {"none": (w0, b0)}
    fits = [_block_fits(block_x(rows_x[train], g), rows_y[train][:, pout[g][pout[g] >= 0]], w0[g])
            for g in range(B)]
    for key in fits[0]:
        candidates[key] = ([f[key][0] for f in fits], [f[key][1] for f in fits])
    losses = {k: loss(*v) for k, v in candidates.items()}
    best = min(losses, key=lambda k: losses[k])
    info = {"method": best, "rows": int(len(rows_x)), "holdout_loss_before": round(losses["none"], 6),
            "holdout_loss_after": round(losses[best], 6)}
    if best == "none":
        return blocks, bias, info
    blocks, bias = blocks.copy(), bias.copy()
    for g in range(B):
        wg, bg = _block_fits(block_x(rows_x, g), rows_y[:, pout[g][pout[g] >= 0]], w0[g], only=best)[best]
        ri, ro = pin[g] >= 0, pout[g] >= 0
        blocks[g][np.ix_(ro, ri)] = wg.T.reshape((ro.sum(), ri.sum()) + t.kernel)
        bias[g][ro] = bg
    return blocks, bias, info


def _upstream(a: BlockLayer, b: BlockLayer) -> bool:
    """Whether `a`'s output (now written by its block form) feeds `b`'s input."""
    seen: set[int] = set()
    stack = [b.x]
    while stack:
        tensor = stack.pop()
        if tensor is a.y:
            return True
        for node in tensor.inputs:
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.inputs)
    return False


def _rows(t: BlockLayer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matching input rows [R, n, (kernel)] and output rows [R, m] (im2col positions for a Conv), and the
    calibration sample each row comes from."""
    if t.op == "Conv":
        return _conv_rows(t, x, y, rng)
    xr = x.reshape(-1, t.n) if t.op != "Gemm" else x.reshape(x.shape[0], -1)
    yr = y.reshape(-1, t.m)
    per = len(xr) // x.shape[0]
    sample = np.arange(len(xr)) // max(per, 1)
    limit = _row_limit(t)
    if len(xr) > limit:
        pick = np.sort(rng.choice(len(xr), limit, replace=False))
        xr, yr, sample = xr[pick], yr[pick], sample[pick]
    return xr.astype(np.float32), yr.astype(np.float64), sample


def _conv_rows(t: BlockLayer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
    """im2col rows [R, n, *kernel] at sampled output positions (compensation's sampler), outputs, samples."""
    windows = conv_windows(t.node, x, t.kernel)
    rows, target, sample = conv_rows(windows, y, np.arange(len(x)), y.shape[2:], _row_limit(t), rng)
    return rows.reshape((len(rows), t.n) + t.kernel), target, sample


def _row_limit(t: BlockLayer) -> int:
    """Rows kept for compensation: MAX_ROWS, fewer for wide layers, but at least 4× a block's inputs."""
    features = t.n * t.kernel_size
    return int(max(min(MAX_ROWS, ROW_FLOATS // features), 4 * -(-features // t.blocks)))


def _block_fits(x: np.ndarray, y: np.ndarray, w0: np.ndarray, only: str | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Refits of one block, x [R, p] → y [R, q], from the kept weights w0 [p, q]:

    `scale`: y ≈ a_j·(x w0_j) + c_j per output; `ridge(α)`: y ≈ a_j·(x w0_j) + x d_j + c_j with ‖d_j‖² penalised
    by λ = α·mean(diag xᵀx) (a_j eliminated in closed form; `ridge.Ridge` solves, with this pass's grid ALPHAS).
    """
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - xm, y - ym
    k = xc @ w0
    out = {}

    def finish(name: str, w: np.ndarray) -> None:
        out[name] = (w, ym - xm @ w)

    if only in (None, "scale"):
        den = (k * k).sum(axis=0)
        a = np.where(den > 1e-30, (k * yc).sum(axis=0) / np.maximum(den, 1e-30), 1.0)
        finish("scale", w0 * a[None, :])
    wanted = [a for a in ALPHAS if only is None or only == f"ridge({a:g})"]
    if not wanted:
        return out
    ridge = Ridge(xc, dtype=np.float64)
    ck, cy = ridge.coords(k), ridge.coords(yc)
    for alpha in wanted:
        inv = ridge.inverse(alpha)[:, None]
        if ridge.dual:  # kᵀMy ∝ kᵀ(xxᵀ+λ)⁻¹y with M = I − x(xᵀx+λ)⁻¹xᵀ; the factor λ cancels in the ratio
            num, den = (ck * cy * inv).sum(axis=0), (ck * ck * inv).sum(axis=0)
        else:
            num = (k * yc).sum(axis=0) - (ck * cy * inv).sum(axis=0)
            den = (k * k).sum(axis=0) - (ck * ck * inv).sum(axis=0)
        a = np.where(den > 1e-30, num / np.maximum(den, 1e-30), 1.0)
        finish(f"ridge({alpha:g})", w0 * a[None, :] + ridge.solve(yc - k * a[None, :], alpha))
    return out
