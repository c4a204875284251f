"""ConvTranspose whose kernel equals its stride (the 2×2/2 upsampling of FPN and DB-detector heads, U-Net and
segmentation decoders) as a 1×1 convolution followed by a pixel shuffle.

With kernel = stride (kh, kw) = (sh, sw), no padding, dilation or groups, every output pixel is one input pixel
times one kernel tap: out[n, o, sh·i + p, sw·j + q] = Σ_c x[n, c, i, j] · W[c, o, p, q]. That is a 1×1 conv to
K·sh·sw channels, channel (o, p, q), whose channels are then interleaved into the output (`_shuffle`: reshape →
permute_dims → reshape, the DepthToSpace of ONNX in CRD order). ONNX Runtime computes it the same way (a GEMM, then
col2im). The phase form (`conv2d.legalize_conv2d_transpose`) packs the K output channels into vectors instead,
which wastes most lanes where K is small (the DB head's last layer: K = 1, 16 inputs, 2×2/2: 0.53 ms for 1.6 M
multiply-adds at 1 thread, ONNX Runtime 0.15) and transposes its channel tile on the way out.

`shuffle_pass` rewrites the graph before legalization, then moves the elementwise ops after the shuffle before it
(`commute`: the bias add, a decomposed BatchNorm's multiply-add, ReLU, sigmoid, quantize/dequantize with one scale,
table lookups; per-channel constants repeated for the sh·sw phases), so they fuse into the 1×1 conv's epilogue
and the shuffle moves the final values only (bytes, after a quantize). `injective.interleave_factor` schedules the
shuffle's store so that LLVM interleaves whole vectors.

A quantized ConvTranspose (int8 weight, dequantized uint8 input) is rewritten whatever its K: its 1×1 conv gets
the weight as dequantize(int8) per output channel (o, p, q), so the int8 rewrite (`int8.py`) computes it with the
dot-product kernels; a dequantize left last before the shuffle goes after it (`_narrow`), so the shuffle moves
bytes and the next layer reads dequantize(uint8). ppocrv6_tiny_det's int8 model: its two ConvTransposes (16 → 16
and the head's 16 → 1) ran in float around their quantize glue, 0.31 + 0.15 ms; in int8 0.18 + 0.07 ms plus
0.02 ms of byte shuffles, model 5.32 → 5.14 ms (A/B, 7 rounds, 1 thread), outputs identical. The weights reach
the build as DequantizeLinear through `squeeze.canonical.integer_weights` (TVM's importer folds `quant`'s
Cast · Mul weight into float constants).
"""
from __future__ import annotations

import numpy as np

from .common import dtype_or, static_shape

#: elementwise ops that commute with the shuffle (a permutation of elements) when their other operands are one
#: value, or, for the broadcasting binary ops, one value per output channel
UNARY = {"relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.exp", "relax.erf", "relax.negative", "relax.abs",
         "relax.sqrt", "relax.rsqrt", "relax.clip", "relax.astype", "relax.nn.gelu", "relax.nn.gelu_tanh",
         "relax.nn.silu", "relax.nn.leakyrelu", "relax.floor", "relax.ceil", "relax.round", "relax.quantize",
         "relax.dequantize"}
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
          "relax.power"}
PERMUTATION = [0, 1, 4, 2, 5, 3]  # [n, K, sh, sw, h, w] → [n, K, h, sh, w, sw]


def shuffle_pass():
    """A module pass: `as_pointwise` then `commute` on every Relax function (first in squeeze's CPU pipeline, so
    the int8 rewrite sees the moved quantize/dequantize chains; again after FoldConstant for decomposed ops)."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeConvTransposeShuffle")
    def _pass(mod, _ctx):
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                out[gv] = commute(as_pointwise(func))
        return out
    return _pass


def pointwise_weight(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose weight [C, K, kh, kw] → the 1×1 conv's OIHW weight [K·kh·kw, C, 1, 1], channel (o, p, q)."""
    c, k, kh, kw = weight.shape
    return np.ascontiguousarray(weight.transpose(1, 2, 3, 0).reshape(k * kh * kw, c, 1, 1))


def _takes(call, weight, lanes: int, integer: bool = False) -> bool:
    """Whether `as_pointwise` rewrites this conv2d_transpose: kernel = stride, no padding, dilation or groups,
    and fewer output channels than a vector has lanes (`lanes`: float32 lanes of the target's widest vector;
    see `as_pointwise`), or any number of them for an `integer` layer (an int8 weight, a dequantized uint8
    input: the 1×1 conv becomes an int8 kernel)."""
    a = call.attrs
    return (len(weight.shape) == 4 and (integer or weight.shape[1] < lanes)
            and tuple(int(v) for v in a.strides) == tuple(weight.shape[2:])
            and all(int(v) == 0 for v in list(a.padding) + list(a.output_padding))
            and all(int(v) == 1 for v in a.dilation) and int(a.groups) == 1
            and (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) == ("NCHW", "IOHW", "NCHW")
            and static_shape(call.args[0]) is not None
            and str(weight.dtype) == ("int8" if integer else "float32") and str(call.args[0].ty.dtype) == "float32")


def _integer_weight(matches: dict, parts: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weight [C, K, kh, kw], scale per output channel [K]) when the matched conv2d_transpose reads a weight
    that is int8 integers times a scale (`quant`'s Cast·Mul, or a DequantizeLinear with zero point 0 on axis 1)
    and a dequantized uint8 input; else None."""
    from tvm import relax  # noqa: PLC0415
    data = matches[parts["x"]]
    if parts["wi"] not in matches or not (isinstance(data, relax.Call) and getattr(data.op, "name", "")
                                          == "relax.dequantize" and str(data.args[0].ty.dtype) == "uint8"):
        return None
    weight = matches[parts["wi"]].value.numpy()
    scale = matches[parts["ws"]].value.numpy().astype(np.float32)
    if weight.dtype != np.int8 or weight.ndim != 4:
        return None
    k = weight.shape[1]
    if parts["dq"] in matches:
        if matches[parts["wz"]].value.numpy().any() or (scale.size > 1 and int(matches[parts["dq"]].attrs.axis) != 1):
            return None
    elif scale.size > 1 and scale.shape != (1, k, 1, 1):
        return None
    if scale.size not in (1, k):
        return None
    return weight, np.broadcast_to(scale.ravel(), (k,)).astype(np.float32)


def as_pointwise(func):
    """conv2d_transpose(x, W) with kernel = stride (module docstring) → shuffle(conv2d_1×1(x, W')), on a CPU
    target, where the ConvTranspose has fewer output channels K than a float32 vector has lanes.

    With K ≥ lanes the phase form fills its channel vectors and writes the output once, where this form writes
    the 1×1 conv's output and the shuffle copies it: new ÷ old at 1 thread (AVX-512, 16 lanes; 2×2/2, input
    channels → K on the input map, 7 interleaved rounds): 16 → 1 on 160² 0.37, 16 → 2 on 80² 0.60, 16 → 4 0.70,
    16 → 8 0.90, 32 → 8 on 40² 0.99; 16 → 16 on 80² 0.96, 32 → 16 on 40² 1.06, 16 → 32 0.96, 64 → 32 on 20² 1.16,
    64 → 64 (with BatchNorm) 1.13. A quantized layer is rewritten at any K (module docstring).
    """
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard  # noqa: PLC0415

    from .simd import describe, is_cpu  # noqa: PLC0415
    target = tvm.target.Target.current(allow_none=True)
    if not is_cpu(target):
        return func
    lanes = describe(target).lanes("float32")
    x, w, wi, ws, wz = wildcard(), is_const(), is_const(), is_const(), is_const()
    dq = is_op("relax.dequantize")(wi, ws, wz)
    parts = dict(x=x, wi=wi, ws=ws, wz=wz, dq=dq)
    root = is_op("relax.nn.conv2d_transpose")(x, w | dq | is_op("relax.multiply")(is_op("relax.astype")(wi), ws))

    from .dot_intrinsics import dot_intrinsic  # noqa: PLC0415
    integers = dot_intrinsic(target) is not None  # else the int8 rewrite leaves the layer float: the K rule holds

    def rewrite(orig, matches):
        integer = _integer_weight(matches, parts) if w not in matches and integers else None
        if integer is None and w not in matches:
            return orig
        weight = matches[w].value.numpy() if integer is None else integer[0]
        if not _takes(orig, weight, lanes, integer is not None):
            return orig
        _, k, kh, kw = weight.shape
        if integer is None:
            new_weight = relax.const(pointwise_weight(weight))
        else:  # dequantize(W_s8) per output channel (o, p, q): what the int8 rewrite (int8.py) takes
            new_weight = relax.op.dequantize(relax.const(pointwise_weight(weight)),
                                             relax.const(np.repeat(integer[1], kh * kw)),
                                             relax.const(np.int8(0)), axis=0)
        z = relax.op.nn.conv2d(matches[x], new_weight, out_dtype=dtype_or(orig.attrs.out_dtype, "float32"))
        n, _, rows, cols = static_shape(matches[x])
        return _shuffle(z, (n, k, rows, cols), kh, kw)
    return rewrite_call(root, rewrite, func)


def _shuffle(z, dims: tuple[int, int, int, int], kh: int, kw: int):
    """[n, K·kh·kw, h, w] → [n, K, h·kh, w·kw] (`dims`: n, K, h, w), channel (o, p, q) to row phase p, column
    phase q."""
    from tvm import relax  # noqa: PLC0415
    n, k, h, w = dims
    six = relax.op.reshape(z, [n, k, kh, kw, h, w])
    return relax.op.reshape(relax.op.permute_dims(six, PERMUTATION), [n, k, h * kh, w * kw])


def commute(func):
    """E(shuffle(z), constants) → shuffle(E(z, constants')) for the elementwise ops E of `UNARY`/`BINARY` and
    `relax.take(table, shuffle(z))` (a lookup), repeated until nothing moves."""
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.dpl import is_op, rewrite_call, wildcard  # noqa: PLC0415
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(1) if isinstance(e, relax.Call) and getattr(
        e.op, "name", "") == "relax.permute_dims" else None)
    if not found:  # no shuffle to move anything through: spare the pattern sweeps
        return func

    def shuffle_pattern():
        z = wildcard()
        six = is_op("relax.reshape")(z, wildcard())
        perm = is_op("relax.permute_dims")(six)
        return z, six, perm, is_op("relax.reshape")(perm, wildcard())

    names = sorted(UNARY | BINARY | {"relax.take"})
    moved_any = [True]
    while moved_any[0]:  # an op moves only once the one before it has
        moved_any[0] = False
        for arity in sorted({_arity(n) for n in names}):
            for position in range(arity):
                z, six, perm, shuffled = shuffle_pattern()
                args = [shuffled if i == position else wildcard() for i in range(arity)]
                ops = [n for n in names if _arity(n) == arity]
                root = is_op(ops[0])(*args)
                for name in ops[1:]:
                    root = root | is_op(name)(*args)

                def rewrite(orig, matches, z=z, six=six, perm=perm, position=position):
                    geometry = _geometry(matches[six], matches[perm])
                    if geometry is None:
                        return orig
                    moved = _moved(orig, position, matches[z], geometry)
                    if moved is None:
                        return orig
                    k, kh, kw = geometry
                    n, _, h, w = static_shape(matches[z])
                    moved_any[0] = True
                    return _shuffle(moved, (n, k, h, w), kh, kw)
                func = rewrite_call(root, rewrite, func)
    return _narrow(func)


def _narrow(func):
    """shuffle(dequantize(q)) → dequantize(shuffle(q)): a dequantize that `commute` moved last before the shuffle
    goes back after it, so that the shuffle moves the quantized bytes (a quarter of the floats), and a layer after
    it reads dequantize(uint8) (the int8 rewrite's pattern: the DB head's last layer computes in int8)."""
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.dpl import is_op, rewrite_call, wildcard  # noqa: PLC0415
    q, s, zp = wildcard(), wildcard(), wildcard()
    deq = is_op("relax.dequantize")(q, s, zp)
    six = is_op("relax.reshape")(deq, wildcard())
    perm = is_op("relax.permute_dims")(six)
    root = is_op("relax.reshape")(perm, wildcard())

    def rewrite(orig, matches):
        call = matches[deq]
        geometry = _geometry(matches[six], matches[perm])
        if geometry is None or any(int(np.prod([int(d) for d in a.ty.shape])) != 1 for a in call.args[1:]):
            return orig
        k, kh, kw = geometry
        n, _, h, w = static_shape(call)
        return relax.Call(call.op, [_shuffle(matches[q], (n, k, h, w), kh, kw), *call.args[1:]], call.attrs)
    return rewrite_call(root, rewrite, func)


def _arity(name: str) -> int:
    """Arguments of the op `name` (a call pattern must give each one)."""
    if name in ("relax.clip", "relax.quantize", "relax.dequantize"):
        return 3
    return 2 if name in BINARY or name == "relax.take" else 1


def _geometry(six, perm) -> tuple[int, int, int] | None:
    """(K, kh, kw) when reshape `six` → permute_dims `perm` → reshape is `_shuffle`'s form, else None."""
    axes = getattr(perm.attrs, "axes", None)
    shape = six.ty.shape
    if axes is None or [int(a) for a in axes] != PERMUTATION or shape is None or len(shape) != 6:
        return None
    return int(shape[1]), int(shape[2]), int(shape[3])


def _moved(call, position: int, z, geometry):
    """`call` with its argument at `position` (a shuffle of `z`) replaced by `z` and its other operands adapted,
    or None where the op does not commute with the shuffle."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    name = call.op.name
    k, kh, kw = geometry
    args = list(call.args)
    args[position] = z
    if name == "relax.take":
        table = call.args[0]
        if position != 1 or not isinstance(table, tvm.ir.GenericConst) or len(table.ty.shape) != 1:
            return None
        return relax.Call(call.op, args, call.attrs)
    if name not in UNARY and name not in BINARY:
        return None
    for i, arg in enumerate(call.args):
        if i == position or (isinstance(arg, tvm.ir.Constant) and not isinstance(arg, tvm.ir.GenericConst)):
            continue  # a scalar attribute (clip's bounds)
        if not isinstance(arg, tvm.ir.GenericConst):
            return None
        value = arg.value.numpy()
        if value.size == 1:
            continue
        if name not in BINARY or value.ndim > 4:
            return None
        four = value.reshape((1,) * (4 - value.ndim) + value.shape)
        if four.shape != (1, k, 1, 1):
            return None
        args[i] = relax.const(np.ascontiguousarray(np.repeat(four, kh * kw, axis=1)), str(value.dtype))
    return relax.Call(call.op, args, call.attrs)
