"""Dense / MatMul with a constant right-hand side (Gemm, MatMul+Add heads), batched over A's leading dims.

Legalization (`legalize_matmul`): for `A[..., M, K] @ B[K, N]` with B a float32 constant,

    B[K, N]  →  Bp[Np/nb, K, nb]          (numpy, at compile time; N padded with zeros)
    out[..., m, n] = Σ_k A[..., m, k] · Bp[n/nb, k, n%nb]

so one tile streams one contiguous panel of B. Schedule (`DensePacked`): a register tile of mt rows × nv·nb
columns; at batch 1 (one row) a tile has too few accumulators to hide FMA latency, so the reduction is split
into `ks` interleaved partial sums (rfactor) and added at the end. Epilogue (bias, activation) is fused.
"""
from __future__ import annotations

import math

import numpy as np

from .common import KERNEL, TILE, TILE_SCOPE, extent, inline_epilogue, kernel_schedule, mark_parallel, product, \
    schedule_rest, tile_epilogue, tile_of, vectorize_columns, worth_parallel
from .common import default_legalization, dtype_or, static_shape
from .tiles import channel_block, register_tile
from .simd import describe, is_cpu

DENSE = "dense_packed"


def plan_dense(m: int, k: int, n: int, cpu, dtype: str) -> tuple[int, int, int, int]:
    """(nb, nv, mt, ks): column block, column vectors per tile, rows per tile, reduction split."""
    lanes = cpu.lanes(dtype)
    nb = channel_block(n, lanes, cpu.full_rate_lanes(dtype))
    nblocks = math.ceil(n / nb) * nb // nb
    vectors = max(1, nb // lanes)
    nv, _, mt = register_tile(1, m, nblocks, vectors, cpu.accumulators())
    acc = nv * vectors * mt
    ks = 1
    for split in (2, 4, 8):
        if acc * ks >= 8 or k % split or k // split < 16:
            break
        ks = split
    return nb, nv, mt, ks


def pack_columns(b: np.ndarray, nb: int) -> np.ndarray:
    """[K, N] → [Np/nb, K, nb], zero-padding N."""
    k, n = b.shape
    np_ = math.ceil(n / nb) * nb
    if np_ != n:
        b = np.concatenate([b, np.zeros((k, np_ - n), b.dtype)], axis=1)
    return np.ascontiguousarray(b.reshape(k, np_ // nb, nb).transpose(1, 0, 2))


def legalize_matmul(bb, call):
    """relax.matmul with a constant 2-D float32 right operand → packed dense; anything else → TOPI."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    a, b = call.args
    target = tvm.target.Target.current(allow_none=True)
    ashape, bshape = static_shape(a), static_shape(b)
    dtype = str(a.ty.dtype)
    out_dtype = dtype_or(getattr(call.attrs, "out_dtype", None), dtype)
    if (not is_cpu(target) or ashape is None or bshape is None or not isinstance(b, tvm.ir.GenericConst)
            or len(bshape) != 2 or len(ashape) < 1 or ashape[-1] != bshape[0] or dtype != "float32"
            or str(b.ty.dtype) != dtype or out_dtype != dtype):
        return default_legalization("relax.matmul")(bb, call)
    k, n = bshape
    m = ashape[-2] if len(ashape) >= 2 else 1
    nb, nv, mt, ks = plan_dense(m, k, n, describe(target), dtype)
    packed = relax.const(pack_columns(b.value.numpy(), nb))
    return bb.call_te(_dense_compute(ashape, n, nb, nv, mt, ks), a, packed, primfunc_name_hint="dense")


def _dense_compute(ashape: list[int], n: int, nb: int, nv: int, mt: int, ks: int):
    def compute(a, packed):
        from tvm import te, topi  # noqa: PLC0415
        vector_input = len(ashape) == 1
        if vector_input:
            a = topi.reshape(a, (1, ashape[0]))
        m, k = (int(v) for v in a.shape[-2:])
        batch = [int(v) for v in a.shape[:-2]]
        nblocks = int(packed.shape[0])
        mp = math.ceil(m / mt) * mt
        if mp != m:
            a = topi.nn.pad(a, [0] * (len(batch) + 2), [0] * len(batch) + [mp - m, 0], name="pad_rows")
        rk = te.reduce_axis((0, k), "k")

        def body(*idx):
            *bi, i, j = idx
            return te.sum(a[(*bi, i, rk)] * packed[j // nb, rk, j % nb], axis=rk)

        out = te.compute((*batch, mp, nblocks * nb), body, name="dense",
                         attrs={KERNEL: DENSE, TILE: [nv, mt, ks]})
        if (mp, nblocks * nb) != (m, n):
            out = te.compute((*batch, m, n), lambda *idx: out[idx], name="dense_crop")
        if vector_input:
            out = topi.reshape(out, (n,))
        return out
    return compute


class DensePacked:
    """Schedule rule for `dense_packed` (see the module docstring)."""

    def apply(self, func, target, tunable: bool):
        return self.schedule(func, target)

    def variants(self, func, target, limit: int) -> list:
        """Other (column vectors, rows, reduction split) tiles and parallel on/off, for tuning to measure."""
        from .common import tile_variants  # noqa: PLC0415
        found = kernel_schedule(func, target, DENSE)
        if found is None:
            return []
        sch, anchor = found
        default = tuple(tile_of(sch, anchor))
        nb = int(sch.get(anchor).reads[-1].source.shape[-1])
        *_, m, n, k = (extent(sch, lp) for lp in sch.get_loops(anchor))
        options = []
        for nv in (1, 2, 4):
            for mt in (1, 2, 4, 6):
                for ks in (1, 2, 4, 8):
                    if (n // nb) % nv or m % mt or k % ks or (nv, mt, ks) == default:
                        continue
                    options.append(((nv, mt, ks), None))
        options.sort(key=lambda o: -min(o[0][0] * o[0][1] * o[0][2], 12))
        return tile_variants(self, func, target, [(default, True), (default, False)] + options, limit)

    def schedule(self, func, target, tile: tuple[int, int, int] | None = None, parallel: bool | None = None):
        found = kernel_schedule(func, target, DENSE)
        if found is None:
            return None
        sch, anchor = found
        nv, mt, ks = tile or tile_of(sch, anchor)
        name = sch.get(anchor).name_hint
        packed = sch.get(anchor).reads[-1].source
        nb = int(packed.shape[-1])
        lanes = describe(target).lanes(str(packed.dtype))
        work = product(extent(sch, lp) for lp in sch.get_loops(anchor))
        rest = inline_epilogue(sch, anchor)
        if ks > 1:
            # partial sums over ks interleaved slices of k (rfactor), added up per tile at the end
            *_, rk = sch.get_loops(anchor)
            sch.rfactor(sch.split(rk, [None, ks])[1], factor_axis=0)
            anchor, partial = sch.get_sblock(name), sch.get_sblock(name + "_rf")
        *batch, i, j, rk = sch.get_loops(anchor)
        io, ii = sch.split(i, [None, mt])
        jo, jv, ji = sch.split(j, [None, nv, nb])
        # column panels outside the row tiles: each panel of the packed weight (k × nv·nb) is read from memory once
        # and stays in cache for every row tile, rather than the whole weight once per row tile. ppocrv6_tiny_rec's
        # CTC head at 48×640 ([80, 80] × [80, 6906]: a 2.2 MB weight) 1.32 → 0.86 ms (ORT 0.91), the model 8.71 →
        # 8.33 ms (1 thread, same process); at 40 rows (48×320) unchanged (0.401 vs 0.404 ms).
        sch.reorder(*batch, jo, io, rk, ii, jv, ji)
        outer = sch.fuse(*batch, jo, io)
        epilogue = tile_epilogue(sch, anchor)
        epilogue_name = sch.get(epilogue).name_hint
        sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
        vectorize_columns(sch, epilogue)
        sch.vectorize(ji)
        sch.unroll(jv)
        sch.unroll(ii)
        if ks > 1:
            sch.compute_at(partial, outer, preserve_unit_loops=True)
            sch.set_scope(partial, 0, TILE_SCOPE)
            pk, pi, pj, pko = sch.get_loops(partial)[-4:]
            pjv, pji = sch.split(pj, [None, nb])
            sch.reorder(pko, pk, pi, pjv, pji)
            sch.vectorize(pji)
            for loop in (pjv, pi, pk):
                sch.unroll(loop)
        producers = [sch.get(b).name_hint for b in sch.get_producers(partial if ks > 1 else anchor)]
        if parallel if parallel is not None else worth_parallel(work):
            mark_parallel(sch, outer)
        init = sch.decompose_reduction(anchor, rk)
        sch.vectorize(sch.get_loops(init)[-1])
        if ks > 1:
            init = sch.decompose_reduction(partial, pko)
            sch.vectorize(sch.get_loops(init)[-1])
        schedule_rest(sch, producers, rest, lanes, {epilogue_name})
        return sch
