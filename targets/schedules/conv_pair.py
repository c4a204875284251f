"""Two convolutions in a row with nothing between them (a factorised layer) as one function: `conv2d_pair`.

`lowrank` turns a k×k conv C→N into k×k C→r then 1×1 r→N, or k×1 C→r then 1×k r→N, and puts the bias on the
second factor, so the first conv's output goes straight into the second. Compiled as two functions, the pair
pays twice for what a layer costs besides its multiply-adds: the first kernel writes its channel-vector tile out
to NCHW (a transposing store of every element, as expensive as the products when a layer sums over only r·1·3
inputs), the second zero-pads that map again in a loop of its own, and the VM makes one more call. On
cifar10_resnet4b's 32→26→32 3×1/1×3 pair on 8×8 that is 3.8 + 4.1 µs against 11.4 µs for the 3×3 it
replaces, 1.45× for 1.85× fewer multiply-adds (1 thread).

`fuse_conv_pairs` (a Relax pass before legalization) replaces conv2d(conv2d(x, W₁), W₂) — float32 NCHW/OIHW,
ungrouped, constant weights, the intermediate used by the second conv only — by one call of:

    mid[n, c/kb, y, x, c%kb]  = Σ pad(x)·W₁p          the first conv, its tile written out as whole vectors
    midp[n, c/kb, y, x, c%kb] = mid, zero-bordered     the second conv's padding (a copy, when it pads)
    out[n, o, y, x]           = Σ midp·W₂p             the second conv, bias/residual/activation fused as usual

with both convs planned and scheduled as `Conv2dPacked` plans and schedules a lone conv (`plan_conv`,
`schedule_channel_tile`); the intermediate stays in the channel-blocked layout the first tile computes it in,
so nothing is transposed, and the second conv broadcasts its inputs from it. The function is marked
out-elementwise-fusable, so FuseOps puts the epilogue after it as for any conv. Pairs where either conv would
take the column-vector tile (`plan_columns`: ≤ 16 input channels on wide rows) are left as two functions: fused
with channel tiles, cifar10_resnet4b's 3→5→16 stem, 16→14→32 and 16→8→32 pairs ran slower (kernel times 3.3 vs
3.1 µs, 5.7 vs 4.0, 0.91 vs 0.78).

Measured (1 thread, benchmarks/results/lowrank_layers.md): the 32→26→32 pair on 8×8 went from 3.8 + 4.1 µs to
7.0 µs in one function, 1.23× → 1.44× the original layer's speed for 1.85× fewer multiply-adds; on 4×4 maps
1.04× → 1.28×. At that point the pair issues about one 16-lane FMA per cycle (Zen 4's peak): 36 other tile pairs
timed within 0.5 %. What is left is the first conv's 26 outputs padded to 32 lanes; `lowrank(multiple=8)` (ranks
rounded to the target's channel multiple) gives 24 → 5.9 µs, 1.65× for 2.0× fewer multiply-adds.
"""
from __future__ import annotations

import math

from .common import KERNEL, TILE, dtype_or, find_kernel, root_blocks, static_shape, var_uses
from .conv2d import ConvPlan, pad_to, pack_weight, plan_columns, plan_conv, schedule_channel_tile
from .simd import describe, is_cpu

FIRST = "conv2d_pair_first"
PAD = "conv2d_pair_pad"
SECOND = "conv2d_pair"
OUT_EWISE_FUSABLE = 4  # relax.OpPatternKind.kOutEWiseFusable: FuseOps fuses injective consumers after it


def _conv_geometry(call) -> dict | None:
    """(k, c, r, s, oh, ow, geometry) of a float32 NCHW conv2d with a constant weight and one group, else None."""
    import tvm  # noqa: PLC0415
    attrs = call.attrs
    data, weight = call.args
    dshape, wshape = static_shape(data), static_shape(weight)
    dtype = str(data.ty.dtype)
    if (dshape is None or wshape is None or not isinstance(weight, tvm.ir.GenericConst) or int(attrs.groups) != 1
            or (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW")
            or dtype != "float32" or str(weight.ty.dtype) != dtype or dtype_or(attrs.out_dtype, dtype) != dtype):
        return None
    _, c, h, w = dshape
    k, _, r, s = wshape
    sh, sw = (int(v) for v in attrs.strides)
    dh, dw = (int(v) for v in attrs.dilation)
    pt, pl, pb, pr = (int(v) for v in attrs.padding)
    oh = (h + pt + pb - dh * (r - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (s - 1) - 1) // sw + 1
    return dict(k=k, c=c, r=r, s=s, oh=oh, ow=ow, pad_after=(pb, pr),
                geometry=dict(strides=(sh, sw), dilation=(dh, dw), pad_before=(pt, pl), in_hw=(h, w)))


def fuse_conv_pairs(mod):
    """`mod` with every conv → conv pair (module docstring) computed by one `conv2d_pair` function."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard  # noqa: PLC0415
    target = tvm.target.Target.current(allow_none=True)
    if not is_cpu(target):
        return mod
    cpu = describe(target)
    inner = is_op("relax.nn.conv2d")(wildcard(), is_const())
    root = is_op("relax.nn.conv2d")(inner, is_const())
    bb = relax.BlockBuilder(mod)
    fused = []

    def rewrite(orig, matches):
        mid = orig.args[0]
        first, second = _conv_geometry(matches[inner]), _conv_geometry(orig)
        if (first is None or second is None or not isinstance(mid, relax.DataflowVar) or uses.get(mid, 0) != 1
                or plan_columns(first["k"], first["c"], first["oh"], first["ow"], cpu, "float32") is not None
                or plan_columns(second["k"], second["c"], second["oh"], second["ow"], cpu, "float32") is not None):
            return orig
        plan1 = plan_conv(first["k"], first["c"], 1, first["oh"], first["ow"], cpu, "float32")
        plan2 = plan_conv(second["k"], second["c"], 1, second["oh"], second["ow"], cpu, "float32")
        w1 = relax.const(pack_weight(matches[inner].args[1].value.numpy(), plan1.kb))
        w2 = relax.const(pack_weight(orig.args[1].value.numpy(), plan2.kb))
        call = bb.call_te(_pair_compute(first, second, plan1, plan2), matches[inner].args[0], w1, w2,
                          primfunc_name_hint="conv2d_pair")
        fused.append(call.args[0])
        return call

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            uses = var_uses(func)
            bb.update_func(gv, rewrite_call(root, rewrite, func))
    if not fused:
        return mod
    out = bb.get()
    for gvar in {g.name_hint: g for g in fused}.values():
        out[gvar] = out[gvar].with_attr("op_pattern", OUT_EWISE_FUSABLE)
    return relax.transform.DeadCodeElimination()(out)


def fuse_conv_pairs_pass():
    """`fuse_conv_pairs` as a module pass (in `pipeline.fuse_passes`, after the weights are constants)."""
    import tvm  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeFuseConvPairs")
    def _pass(mod, _ctx):
        return fuse_conv_pairs(mod)
    return _pass


def _pair_compute(first: dict, second: dict, plan1: ConvPlan, plan2: ConvPlan):
    def compute(data, packed1, packed2):
        from tvm import te, tirx  # noqa: PLC0415
        n = data.shape[0]
        mid = _packed_conv(data, packed1, first, plan1)
        # the second conv's zero border (and rows/columns its tile reads past the map)
        (pt, pl), (sh, sw), (dh, dw) = (second["geometry"][key] for key in ("pad_before", "strides", "dilation"))
        ohp, owp = _padded(second["oh"], plan2.ht), _padded(second["ow"], plan2.wt)
        rows, cols = (ohp - 1) * sh + (second["r"] - 1) * dh + 1, (owp - 1) * sw + (second["s"] - 1) * dw + 1
        oh1, ow1 = first["oh"], first["ow"]
        if pt == pl == 0 and rows <= int(mid.shape[2]) and cols <= int(mid.shape[3]):
            source = mid  # no border: read the first conv's (tile-padded) map itself
        else:
            def border(b, c, y, x):
                inside = tirx.all(y >= pt, y < pt + oh1, x >= pl, x < pl + ow1)
                return tirx.if_then_else(inside, mid[b, c, y - pt, x - pl], tirx.const(0, data.dtype))
            source = te.compute((n, mid.shape[1], rows, cols), border, name=PAD)
        kblocks2, r, kr, ks, kb2 = (int(v) for v in packed2.shape)
        rc = te.reduce_axis((0, r), "rc")
        ry = te.reduce_axis((0, kr), "ry")
        rx = te.reduce_axis((0, ks), "rx")
        conv = te.compute(
            (n, kblocks2 * kb2, ohp, owp),
            lambda b, o, y, x: te.sum(source[b, rc, y * sh + ry * dh, x * sw + rx * dw]
                                      * packed2[o // kb2, rc, ry, rx, o % kb2], axis=[rc, ry, rx]),
            name="conv2d_nchw", attrs={KERNEL: SECOND, TILE: [plan2.kv, plan2.ht, plan2.wt]})
        k = second["k"]
        if (kblocks2 * kb2, ohp, owp) == (k, second["oh"], second["ow"]):
            return conv
        return te.compute((n, k, second["oh"], second["ow"]), lambda b, o, y, x: conv[b, o, y, x],
                          name="conv2d_crop")
    return compute


def _padded(size: int, tile: int) -> int:
    return math.ceil(size / tile) * tile


def _packed_conv(data, packed, spec: dict, plan: ConvPlan):
    """The first conv over its tile-padded output, all Kp (padded) channels: [n, Kp, OHp, OWp]."""
    from tvm import te  # noqa: PLC0415
    kblocks, c, r, s, kb = (int(v) for v in packed.shape)
    ohp, owp = _padded(spec["oh"], plan.ht), _padded(spec["ow"], plan.wt)
    (sh, sw), (dh, dw) = spec["geometry"]["strides"], spec["geometry"]["dilation"]
    padded = pad_to(data, (ohp, owp), (r, s), spec["geometry"], name="pad_temp")
    rc = te.reduce_axis((0, c), "rc")
    ry = te.reduce_axis((0, r), "ry")
    rx = te.reduce_axis((0, s), "rx")
    return te.compute(
        (data.shape[0], kblocks * kb, ohp, owp),
        lambda b, o, y, x: te.sum(padded[b, rc, y * sh + ry * dh, x * sw + rx * dw] * packed[o // kb, rc, ry, rx, o % kb],
                                  axis=[rc, ry, rx]),
        name="conv2d_pair_mid", attrs={KERNEL: FIRST, TILE: [plan.kv, plan.ht, plan.wt]})


class Conv2dPair:
    """Schedule rule for `conv2d_pair` functions (module docstring): each conv as `Conv2dPacked` schedules one,
    the first conv's tile copied out channel block by channel block into the intermediate."""

    def apply(self, func, target, tunable: bool):
        return self.schedule(func, target)

    def schedule(self, func, target, tiles: tuple | None = None):
        """`tiles`: (first conv's, second conv's) register tiles instead of the planned ones."""
        from tvm import s_tir  # noqa: PLC0415
        if not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        first, second = find_kernel(sch, FIRST), find_kernel(sch, SECOND)
        if first is None or second is None:
            return None
        kb = int(sch.get(first).reads[1].source.shape[-1])
        blocked = lambda b, o, y, x: (b, o // kb, y, x, o % kb)  # noqa: E731
        names = [sch.get(b).name_hint for b in root_blocks(sch)]
        if PAD in names:  # the border copy: channel-blocked like the map it copies, lanes innermost
            pad = sch.get_sblock(PAD)
            sch.transform_layout(pad, ("write", 0), blocked)
            b, o, y, x = sch.get_loops(pad)
            ob, ol = sch.split(o, [None, kb])
            sch.reorder(b, ob, y, x, ol)
        # the second conv first, its epilogue inlined; nothing before it may be
        tile1, tile2 = tiles or (None, None)
        schedule_channel_tile(sch, second, target, tile2, keep=names[:names.index(sch.get(second).name_hint)])
        first = find_kernel(sch, FIRST)
        others = [sch.get(b).name_hint for b in root_blocks(sch) if not b.same_as(first)]
        schedule_channel_tile(sch, first, target, tile1, keep=others, layout=blocked)
        return sch
