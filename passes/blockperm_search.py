"""Permutation search for `blockperm`: balanced co-clustering of |W|² into B diagonal blocks.

A layer's weight becomes block-diagonal after its rows and columns are permuted; the blocks keep the energy
E = Σ_g Σ_{i∈R_g, j∈C_g} S_ij of a non-negative score S (w², or w²·E[x²] with calibration data), and the search
maximises it (MPDCompress, Supic et al. 2018, trains with such a fixed mask; here it is chosen after training).

Several layers can share one partition: when a permutation is folded into the neighbours, every block layer that
reads or writes the same channel group must see the same clusters in the same order (block g of every layer reads
cluster g of its input partition and writes cluster g of its output partition). So the problem is stated over
*partitions* (variables) and *layers* (a score matrix between an output and an input partition); a layer's
objective is its kept fraction, and the search maximises the sum over layers:

1. seed: spectral co-clustering of the largest layer first (Dhillon 2001: singular vectors of the normalised
   score, k-means, then a balanced assignment to the centroids), the rest of the partitions assigned given it;
   also the identity partition and `restarts` random ones;
2. refine: coordinate ascent — each partition in turn is the exact optimum given all the others, a balanced
   assignment (the Hungarian algorithm, scipy's `linear_sum_assignment`, for up to 1024 items; greedy plus
   cycle cancelling, also exact, beyond) — until nothing changes.

Partitions of sizes not divisible by B are padded with dummy items (score 0): blocks are ⌈n/B⌉ wide, and the
dummies become zero rows/columns of the padded blocks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
from scipy.optimize import linear_sum_assignment

#: Above this many items a partition is assigned by greedy + cycle cancelling instead of the Hungarian method.
HUNGARIAN_LIMIT = 1024


@dataclass
class LayerScore:
    """One block layer: its score matrix [output items, input items] and the partitions of its two sides."""

    score: np.ndarray
    out_var: Hashable
    in_var: Hashable

    @property
    def total(self) -> float:
        return float(self.score.sum())


@dataclass
class Solution:
    """Cluster label (0..B-1) per item of every partition, padded items (dummies) included at the end."""

    labels: dict[Hashable, np.ndarray]
    kept: list[float]  # kept fraction per layer, in the order given
    seed: str = ""
    history: list[tuple[str, float]] = field(default_factory=list)

    @property
    def objective(self) -> float:
        return float(sum(self.kept))


def padded(size: int, blocks: int) -> int:
    return -(-size // blocks) * blocks


# ---------------------------------------------------------------------------------------- balanced assignment

def balanced_assign(score: np.ndarray, cap: int) -> np.ndarray:
    """Label per item maximising Σ score[i, label(i)] with exactly `cap` items per label (n = B·cap), exactly."""
    n, blocks = score.shape
    if n != blocks * cap:
        raise ValueError(f"{n} items cannot fill {blocks} clusters of {cap}")
    if n <= HUNGARIAN_LIMIT:
        rows, cols = linear_sum_assignment(np.repeat(score, cap, axis=1), maximize=True)
        out = np.empty(n, dtype=np.int64)
        out[rows] = cols // cap
        return out
    return cancel_cycles(score, exchange_pairs(score, _greedy(score, cap)))


def _greedy(score: np.ndarray, cap: int) -> np.ndarray:
    """Items with the largest regret (best minus second best) first, each to its best cluster with room."""
    n, blocks = score.shape
    ranked = np.sort(score, axis=1)
    order = np.argsort(-(ranked[:, -1] - ranked[:, -2]) if blocks > 1 else np.zeros(n), kind="stable")
    prefs = np.argsort(-score, axis=1, kind="stable")
    room = np.full(blocks, cap)
    out = np.empty(n, dtype=np.int64)
    for i in order:
        for g in prefs[i]:
            if room[g]:
                out[i] = g
                room[g] -= 1
                break
    return out


def exchange_pairs(score: np.ndarray, labels: np.ndarray, tol: float = 1e-12, rounds: int = 100) -> np.ndarray:
    """Many improving swaps at once: for each pair of clusters, pair the best movers in both directions while
    the two moves together gain (the 2-cycles of `cancel_cycles`, batched; it finishes the job)."""
    labels = labels.copy()
    n, blocks = score.shape
    rows = np.arange(n)
    for _ in range(rounds):
        moved = False
        for g in range(blocks):
            for h in range(g + 1, blocks):
                own = score[rows, labels]
                a, b = np.flatnonzero(labels == g), np.flatnonzero(labels == h)
                if not a.size or not b.size:
                    continue
                ga, gb = score[a, h] - own[a], score[b, g] - own[b]
                a, b = a[np.argsort(-ga, kind="stable")], b[np.argsort(-gb, kind="stable")]
                pair = np.sort(ga)[::-1][:min(len(a), len(b))] + np.sort(gb)[::-1][:min(len(a), len(b))]
                k = int((pair > tol).sum())
                if k:
                    labels[a[:k]], labels[b[:k]] = h, g
                    moved = True
        if not moved:
            break
    return labels


def cancel_cycles(score: np.ndarray, labels: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Improve a balanced assignment to optimality: move one item along each edge of a positive-gain cycle of
    clusters (the best item per edge) until none is left — the min-cost-flow optimality condition."""
    labels = labels.copy()
    n, blocks = score.shape
    rows = np.arange(n)
    for _ in range(50 * n + 100):
        own = score[rows, labels]
        gain = np.full((blocks, blocks), -np.inf)
        best = np.zeros((blocks, blocks), dtype=np.int64)
        for g in range(blocks):
            members = np.flatnonzero(labels == g)
            if members.size:
                delta = score[members] - own[members, None]
                k = delta.argmax(axis=0)
                gain[g] = delta[k, np.arange(blocks)]
                best[g] = members[k]
        np.fill_diagonal(gain, -np.inf)
        cycle = _positive_cycle(gain, tol)
        if cycle is None:
            return labels
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            labels[best[a, b]] = b
    return labels


def _positive_cycle(gain: np.ndarray, tol: float) -> list[int] | None:
    """A cycle of clusters with positive total gain (Bellman-Ford on the negated gains), or None."""
    blocks = len(gain)
    weight = np.where(np.isfinite(gain), -gain, np.inf)
    dist = np.zeros(blocks)
    pred = np.full(blocks, -1)
    last = -1
    for _ in range(blocks + 1):
        last = -1
        for u in range(blocks):
            cand = dist[u] + weight[u]
            better = cand < dist - tol
            if better.any():
                idx = np.flatnonzero(better)
                dist[idx] = cand[idx]
                pred[idx] = u
                last = int(idx[-1])
        if last < 0:
            return None
    for _ in range(blocks):
        last = int(pred[last])
    cycle = [last]
    node = int(pred[last])
    while node != last:
        cycle.append(node)
        node = int(pred[node])
    cycle.reverse()
    return cycle


# ---------------------------------------------------------------------------------------------- partitions

def identity_labels(size: int, blocks: int) -> np.ndarray:
    """Contiguous clusters in the original order (what block-diagonalising without a permutation keeps)."""
    return np.arange(padded(size, blocks)) // (padded(size, blocks) // blocks)


def random_labels(size: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(identity_labels(size, blocks))


def kept_fraction(score: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """Fraction of Σ score inside the diagonal blocks (labels of padded items are ignored)."""
    total = float(score.sum())
    if total <= 0:
        return 1.0
    r, c = rows[:score.shape[0]], cols[:score.shape[1]]
    return float(score[r[:, None] == c[None, :]].sum()) / total


def cluster_sums(score: np.ndarray, labels: np.ndarray, blocks: int, axis: int) -> np.ndarray:
    """Σ of `score` over the items of each cluster along `axis` (labels may be padded): [other items, B]."""
    labels = labels[:score.shape[axis]]
    onehot = np.zeros((len(labels), blocks))
    onehot[np.arange(len(labels)), labels] = 1.0
    return score @ onehot if axis == 1 else score.T @ onehot


# -------------------------------------------------------------------------------------------------- search

def search(layers: list[LayerScore], sizes: dict[Hashable, int], blocks: int, restarts: int = 2,
           rng: np.random.Generator | None = None, max_rounds: int = 50) -> Solution:
    """Labels for every partition maximising Σ_layers kept fraction; the best of the spectral seed, the identity
    seed and `restarts` random seeds, each refined by coordinate ascent."""
    rng = rng if rng is not None else np.random.default_rng(0)
    seeds: list[tuple[str, dict[Hashable, np.ndarray]]] = [("spectral", _spectral_seed(layers, sizes, blocks, rng))]
    seeds.append(("identity", {v: identity_labels(n, blocks) for v, n in sizes.items()}))
    for r in range(restarts):
        seeds.append((f"random{r}", {v: random_labels(n, blocks, rng) for v, n in sizes.items()}))
    best: Solution | None = None
    history = []
    for name, labels in seeds:
        labels = refine(layers, sizes, blocks, labels, max_rounds)
        kept = [kept_fraction(l.score, labels[l.out_var], labels[l.in_var]) for l in layers]
        history.append((name, float(sum(kept))))
        if best is None or sum(kept) > best.objective + 1e-12:
            best = Solution(labels, kept, name)
    assert best is not None
    best.history = history
    return best


def refine(layers: list[LayerScore], sizes: dict[Hashable, int], blocks: int,
           labels: dict[Hashable, np.ndarray], max_rounds: int = 50) -> dict[Hashable, np.ndarray]:
    """Coordinate ascent: re-assign each partition optimally given the others, until no label changes."""
    labels = {v: l.copy() for v, l in labels.items()}
    weights = [1.0 / l.total if l.total > 0 else 0.0 for l in layers]
    for _ in range(max_rounds):
        changed = False
        for var, size in sizes.items():
            score = np.zeros((padded(size, blocks), blocks))
            for layer, w in zip(layers, weights):
                if layer.out_var == var:
                    score[:layer.score.shape[0]] += w * cluster_sums(layer.score, labels[layer.in_var], blocks, 1)
                if layer.in_var == var:
                    score[:layer.score.shape[1]] += w * cluster_sums(layer.score, labels[layer.out_var], blocks, 0)
            new = balanced_assign(score, len(score) // blocks)
            if (score[np.arange(len(new)), new].sum()
                    > score[np.arange(len(new)), labels[var]].sum() + 1e-12 * max(1.0, abs(score).sum())):
                labels[var] = new
                changed = True
        if not changed:
            break
    return labels


def _spectral_seed(layers: list[LayerScore], sizes: dict[Hashable, int], blocks: int,
                   rng: np.random.Generator) -> dict[Hashable, np.ndarray]:
    """Largest layer first: spectral co-clustering where both sides are free, else the free side given the other."""
    labels: dict[Hashable, np.ndarray] = {}
    for layer in sorted(layers, key=lambda l: -l.score.size):
        have_out, have_in = layer.out_var in labels, layer.in_var in labels
        if have_out and have_in:
            continue
        if not have_out and not have_in and layer.out_var != layer.in_var:
            rows, cols = spectral_coclusters(layer.score, blocks, sizes[layer.out_var], sizes[layer.in_var], rng)
            labels[layer.out_var], labels[layer.in_var] = rows, cols
        elif not have_in:
            fixed = labels.get(layer.out_var, identity_labels(sizes[layer.out_var], blocks))
            score = np.zeros((padded(sizes[layer.in_var], blocks), blocks))
            score[:layer.score.shape[1]] = cluster_sums(layer.score, fixed, blocks, 0)
            labels[layer.in_var] = balanced_assign(score, len(score) // blocks)
            labels.setdefault(layer.out_var, fixed)
        else:
            fixed = labels[layer.in_var]
            score = np.zeros((padded(sizes[layer.out_var], blocks), blocks))
            score[:layer.score.shape[0]] = cluster_sums(layer.score, fixed, blocks, 1)
            labels[layer.out_var] = balanced_assign(score, len(score) // blocks)
    for var, size in sizes.items():
        labels.setdefault(var, identity_labels(size, blocks))
    return labels


def spectral_coclusters(score: np.ndarray, blocks: int, n_rows: int, n_cols: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Balanced spectral co-clustering (Dhillon 2001) of a non-negative matrix; labels padded to B multiples."""
    from sklearn.cluster import KMeans  # noqa: PLC0415  (only the search needs it)
    m, n = score.shape
    d1 = np.sqrt(score.sum(axis=1)) + 1e-12
    d2 = np.sqrt(score.sum(axis=0)) + 1e-12
    normalised = score / d1[:, None] / d2[None, :]
    k = min(max(1, int(np.ceil(np.log2(blocks)))), min(m, n) - 1)
    if k < 1:
        return identity_labels(n_rows, blocks), identity_labels(n_cols, blocks)
    # singular vectors from the eigenvectors of the smaller Gram matrix (an SVD of the wide matrix is slow)
    if m <= n:
        evals, u = np.linalg.eigh(normalised @ normalised.T)
        u = u[:, ::-1][:, :k + 1]
        v = normalised.T @ u / np.sqrt(np.maximum(evals[::-1][:k + 1], 1e-30))[None, :]
    else:
        evals, v = np.linalg.eigh(normalised.T @ normalised)
        v = v[:, ::-1][:, :k + 1]
        u = normalised @ v / np.sqrt(np.maximum(evals[::-1][:k + 1], 1e-30))[None, :]
    z = np.concatenate([u[:, 1:k + 1] / d1[:, None], v[:, 1:k + 1] / d2[:, None]])
    z /= max(float(np.abs(z).max()), 1e-30)
    with warnings.catch_warnings():  # fewer distinct points than clusters is fine: the assignment balances
        warnings.simplefilter("ignore")
        km = KMeans(blocks, n_init=4, random_state=int(rng.integers(1 << 31))).fit(z)
    closeness = -((z[:, None, :] - km.cluster_centers_[None]) ** 2).sum(axis=-1)
    rows = np.zeros((padded(n_rows, blocks), blocks))
    cols = np.zeros((padded(n_cols, blocks), blocks))
    rows[:m], cols[:n] = closeness[:m], closeness[m:]
    # dummies are indifferent; shift real scores positive so they never prefer a dummy's place
    rows[:m] -= rows[:m].min() - 1.0
    cols[:n] -= cols[:n].min() - 1.0
    return balanced_assign(rows, len(rows) // blocks), balanced_assign(cols, len(cols) // blocks)
