"""Integer compute for QDQ models: u8×s8→s32 convolution / dense with requantize, on the CPU's dot-product
instructions.

squeeze's `quant` pass writes DequantizeLinear(x_u8) · DequantizeLinear(w_s8) → Conv/Gemm/MatMul (+ int32 bias)
→ QuantizeLinear. TVM's ONNX frontend imports that as float arithmetic (`relax.dequantize` → float conv →
`relax.quantize`), and FoldConstant turns the weights into float constants: int8 storage, float compute.

**Where the pattern is recognised.** On the imported Relax module (`rewrite_qdq`, a `tvm.relax.dpl` rewrite run
first in squeeze's CPU pipeline), not on the ONNX side: the frontend has already resolved what ONNX spells in
several ways (opset-dependent attributes, Gemm's transB/alpha/beta, MatMul broadcasting, axis defaults), the
rewrite sees constants as constants, and the int8 form stays inside the TVM build (the saved model and ONNX
Runtime's view of it do not change). Matched:

    quantize( [add(] conv2d|matmul( dequantize(x_u8, sx, zx), dequantize(W_s8, sw, 0) ) [, reshape(dequantize(b_s32, sx·sw, 0))] )

with constant scales and zero points, W zero point 0 (symmetric, per output channel or per tensor) and the
bias scale equal to sx·sw (float32, as ONNX Runtime assumes). It becomes

    acc = conv2d(pad(x_u8, value=zx), W_s8, out_dtype=int32) + (b − zx·ΣW)         (exact integers)
    y   = clamp(round_half_even(float32(acc) · M) + zy, 0, 255),  M = float32(sx·sw) / sy

which is ONNX Runtime's QLinearConv/QGemm requantization (MLAS: int32 → float, multiply by the per-channel
float scale, round to nearest even, add the zero point, saturate): bit-exact with its int8 execution. Padding
with zx instead of 0 makes the zero-point correction a per-channel constant. Without a QuantizeLinear after it
(a float layer output) the result is float32(acc)·(sx·sw) and the float bias add stays as it was.

**Glue.** A QuantizeLinear after a MaxPool or a Concat moves before it (`_integer_glue`, exact), so it meets
the DequantizeLinear of the int8 layer before and fuses into that layer's epilogue: the layer writes uint8 and
the pool / concat move bytes. An elementwise chain on one quantized tensor (a quantized GELU, hard-sigmoid, the
sigmoid of an output) becomes one gather from a 256-entry table that ONNX Runtime computed (`int8_tables.py`).

**Kernels.** `legalize_conv2d_int8` / `legalize_matmul_int8` pack the weight at compile time as
[K/kb, C/4, R, S, kb, 4] (kb output channels × 4 input channels, the operand of one dot-product instruction) and
the activation as [N, C/4, H, W, 4]; `Int8Kernel` tensorizes the kb × 4 update with `dot_intrinsic(target)`:

| target | instruction | intrinsic | kb |
|---|---|---|---|
| x86 AVX-512 VNNI | `vpdpbusd zmm` (u8×s8, 16 int32 lanes) | `squeeze_dot_16x4_vnni` | 16 |
| x86 AVX-VNNI | `vpdpbusd ymm` | `squeeze_dot_8x4_avxvnni` | 8 |
| x86 AVX-512BW / AVX2 | `vpmaddubsw` + `vpmaddwd` | `squeeze_dot_16x4_avx512bw` / `_8x4_avx2` | 16 / 8 |
| aarch64 dotprod | `sdot` (s8×s8) | `squeeze_dot_4x4_i8i8s32_sdot` | 4 |

That is the **channel form** (lanes over output channels). Where the map is at least one vector wide, the
**column form** usually wins (`columns_win`): the weight is packed [K, C/4, R, S, 4], the activation
[N, C/4, H, sw, W/sw, 4] (stride phases apart), and each instruction multiplies `lanes` consecutive output columns
(4 input channels each, one contiguous load) by one output channel's 4 weights broadcast (the `_columns` form of
each intrinsic below: `vpdpbusd` with an embedded broadcast). The epilogue then runs over columns and stores them
contiguously, where the channel form transposes channel vectors into NCHW planes through a staging tile.

A **depthwise** conv (groups = channels) has no dot product over input channels: `_legalize_depthwise_int8` runs
the float depthwise kernel on exact integer values (uint8 taps converted once per padded tile, int8 weights as
floats; float32 sums are exact up to 513 taps), so it reads and writes bytes like the other int8 layers and
matches ONNX Runtime's QLinearConv bit for bit.

The intrinsics are TVM tensor intrinsics (`TensorIntrin.register`, applied with `sch.tensorize`) registered
in `dot_intrinsics.py`, not TVM 0.27's stock ones: its `dot_16x4_vnni` passes <16 x i32> operands to
`llvm.x86.avx512.vpdpbusd.512`, which the bundled LLVM declares on <64 x i8> and rejects, and importing
`tvm.s_tir.tensor_intrin` (for `dot_4x4_i8i8s32_sdot`) registers every CUDA intrinsic first: about a minute per
build process.

`sdot` multiplies signed bytes: the activation is packed as x − 128 (an xor of the sign bit) and 128·ΣW is
added back to the bias, still exact. `vpmaddubsw` adds two u8×s8 products into a saturating int16: exact only
when |w₀| + |w₁| ≤ 128 for every weight pair it pairs; a layer whose weights break that uses the exact VNNI /
sdot path or, without one, stays float (`_pairs_fit`) — ONNX Runtime's AVX2 kernels saturate there instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import KERNEL, TILE, TILE_SCOPE, divide_exactly, extent, guarded, inline_epilogue, kernel_schedule, \
    mark_parallel, peel_partial_tiles, product, schedule_rest, worth_parallel
from .dot_intrinsics import COLUMNS, INSTRUCTIONS, dot_intrinsic, pairs_fit, signed_activations
from .int8_tables import lookup_tables
from .simd import describe, is_cpu

CONV_INT8 = "conv2d_int8_packed"
CONV_INT8_COLUMNS = "conv2d_int8_columns"
DENSE_INT8 = "dense_int8_packed"
EPILOGUE_COLUMNS = "squeeze.epilogue_columns"  #: block attribute: vectorize the epilogue over output columns
COLUMN_VECTORS = "squeeze.column_vectors"  #: block attribute: column vectors per column tile (`column_vectors`)
INT8_LAYERS = "squeeze.int8_layers"   #: module attribute: how many layers `rewrite_qdq` turned into int8 compute


# ---------------------------------------------------------------------------------------------- Relax rewrite

def rewrite_qdq(mod, form=None, tables: bool = True):
    """`mod` with every quantized Conv/Gemm/MatMul (module docstring) computed in integers; the count of
    rewritten layers is the module attribute `INT8_LAYERS`. Functions other than Relax ones are left alone.

    `form(layer: IntegerLayer)` builds each layer's replacement: by default `relax_form` (the CPU kernels here),
    and only where the current target has a dot-product instruction; the mcu target passes its C kernels' call.
    `tables` False leaves elementwise chains as they are (`int8_tables`; for callers that only count layers)."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.dpl import rewrite_call  # noqa: PLC0415
    if form is None:
        if dot_intrinsic(tvm.target.Target.current(allow_none=True)) is None:
            return mod
        form = relax_form
    counter = [0]
    quantized, plain = _patterns()
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        func = rewrite_call(quantized[0], _rewriter(quantized[1], counter, True, form), func)
        func = rewrite_call(plain[0], _rewriter(plain[1], counter, False, form), func)
        func = _drop_round_trips(_integer_glue(func))
        out[gv] = lookup_tables(func) if tables else func
    out = relax.transform.DeadCodeElimination()(out)
    return out.with_attr(INT8_LAYERS, counter[0]) if counter[0] else out


def _integer_glue(func):
    """Move QuantizeLinear before MaxPool, Concat and a nearest-neighbour Resize: quantize(max_pool(y)) →
    max_pool(quantize(y)), quantize(concat(y₁, y₂, …)) → concat(quantize(y₁), quantize(y₂), …),
    quantize(resize_nearest(y)) → resize_nearest(quantize(y)), repeated until nothing moves.

    All are exact: quantize (divide by a positive scale, round, add, saturate) is monotone non-decreasing, so
    it commutes with a max over a window that holds at least one real element (every pool window does), and a
    concat or a nearest-neighbour resize only moves values. The quantize then meets the dequantize after the
    int8 layer that produced y and fuses into that layer's epilogue: the layer writes uint8, the pool / concat /
    resize move bytes instead of float32 (squeezenet: every Fire module's concat and its three max pools;
    ppocrv6_tiny_det: the FPN's upsampling and the concat of its four scales).
    """
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.dpl import is_const, is_op, wildcard  # noqa: PLC0415
    scale, zero = is_const(), is_const()
    inner = is_op("relax.nn.max_pool2d")(wildcard()) | is_op("relax.concat")(wildcard()) \
        | is_op("relax.image.resize2d")(wildcard(), wildcard())
    root = is_op("relax.quantize")(inner, scale, zero)

    def rewrite(orig, matches):
        call = matches[inner]
        if not _per_tensor(matches[scale]) or not _per_tensor(matches[zero]):
            return orig

        def quantize(y):
            return relax.op.quantize(y, matches[scale], matches[zero], axis=int(orig.attrs.axis),
                                     out_dtype=str(orig.attrs.out_dtype))
        if call.op.name == "relax.nn.max_pool2d":
            return relax.Call(call.op, [quantize(call.args[0])], call.attrs)
        if call.op.name == "relax.image.resize2d":
            moved = _resized(call, quantize, str(orig.attrs.out_dtype))
            return orig if moved is None else moved
        fields = call.args[0]
        if not isinstance(fields, relax.Tuple):
            return orig
        return relax.Call(call.op, [relax.Tuple([quantize(f) for f in fields.fields])], call.attrs)

    from tvm.relax.dpl import rewrite_call  # noqa: PLC0415
    return rewrite_call(root, rewrite, func)


def _resized(call, quantize, dtype: str):
    """A nearest-neighbour resize2d `call` of quantize(its input) in `dtype`, or None for another method or a
    mode that fills with an extrapolation value."""
    from tvm import relax  # noqa: PLC0415
    a = call.attrs
    if str(a.method) != "nearest_neighbor" or str(a.coordinate_transformation_mode) == "tf_crop_and_resize":
        return None
    return relax.op.image.resize2d(quantize(call.args[0]), call.args[1], roi=[float(v) for v in a.roi],
                                   layout=str(a.layout), method="nearest_neighbor",
                                   coordinate_transformation_mode=str(a.coordinate_transformation_mode),
                                   rounding_method=str(a.rounding_method), cubic_alpha=float(a.cubic_alpha),
                                   cubic_exclude=int(a.cubic_exclude), out_dtype=dtype)


def _drop_round_trips(func):
    """quantize(dequantize(q, s, z), s, z) → q: a round trip through float with the same constant per-tensor scale
    and zero point returns q exactly ((q − z)·s rounds to within 2⁻²⁴ relative, ÷ s back to within 255·2⁻²³ of
    the integer q − z). `_integer_glue` leaves one wherever a pool or concat keeps its input's quantization (a max
    pool always does, a concat for the input whose range it took): without this, the layer before requantizes
    every output element a second time for nothing."""
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard  # noqa: PLC0415
    q, s1, z1, s2, z2 = wildcard(), is_const(), is_const(), is_const(), is_const()
    root = is_op("relax.quantize")(is_op("relax.dequantize")(q, s1, z1), s2, z2)

    def rewrite(orig, matches):
        x = matches[q]
        same = all(_per_tensor(matches[a]) and _per_tensor(matches[b]) and _value(matches[a]).item() ==
                   _value(matches[b]).item() for a, b in ((s1, s2), (z1, z2)))
        return x if same and str(x.ty.dtype) == str(orig.ty.dtype) else orig
    return rewrite_call(root, rewrite, func)


def _per_tensor(expr) -> bool:
    return _value(expr).size == 1


def _patterns():
    """((root, parts) for quantize(bias-add(layer)), (root, parts) for a layer with a float output)."""
    from tvm.relax.dpl import is_const, is_op, wildcard  # noqa: PLC0415

    def parts():
        x = wildcard()
        xs, xz, w, ws, wz = is_const(), is_const(), is_const(), is_const(), is_const()
        dq_x = is_op("relax.dequantize")(x, xs, xz)
        dq_w = is_op("relax.dequantize")(w, ws, wz)
        perm = is_op("relax.permute_dims")(dq_w)
        layer = is_op("relax.nn.conv2d")(dq_x, dq_w) | is_op("relax.matmul")(dq_x, dq_w) \
            | is_op("relax.matmul")(dq_x, perm)
        return dict(x=x, xs=xs, xz=xz, w=w, ws=ws, wz=wz, perm=perm, layer=layer)

    q = parts()
    b, bs, bz = is_const(), is_const(), is_const()
    dq_b = is_op("relax.dequantize")(b, bs, bz)
    bias = is_op("relax.reshape")(dq_b, wildcard()) | dq_b
    biased = is_op("relax.add")(q["layer"], bias) | q["layer"]
    ys, yz = is_const(), is_const()
    root = is_op("relax.quantize")(biased, ys, yz)
    q.update(b=b, bs=bs, bz=bz, ys=ys, yz=yz, root=root)
    p = parts()
    p["root"] = p["layer"]
    return (root, q), (p["layer"], p)


def _rewriter(parts: dict, counter: list, requantize: bool, form):
    def rewrite(orig, matches):
        try:
            new = form(integer_layer(orig, matches, parts, requantize, depthwise=form is relax_form))
        except NoMatch:
            return orig
        counter[0] += 1
        return new
    return rewrite


class NoMatch(Exception):
    """The matched layer does not have the form the integer kernels compute exactly."""


def _value(expr) -> np.ndarray:
    return expr.value.numpy()


@dataclass
class IntegerLayer:
    """One quantized layer as exact integer arithmetic: acc = Σ (x − zx)·w + bias (int32), then either
    y = clamp(round_half_even(float32(acc)·multiplier) + zy, 0, 255) (requantize) or float32(acc)·scale."""

    x: Any                      # the uint8 activation (Relax expression)
    w: np.ndarray               # int8 weight: OIHW for a conv, [K_in, N] for a matmul
    conv: Any | None            # the conv2d's attributes (NCHW / OIHW, groups 1); None for a matmul
    zx: int                     # the activation's zero point
    bias: np.ndarray            # int64 [k]: the layer's int32 bias (zeros without one)
    scale: np.ndarray           # float32 [k]: sx·sw, the accumulator's scale
    multiplier: np.ndarray | None  # float32 [k]: scale / sy when requantizing, else None
    zy: Any | None              # the output zero point (a Relax constant) when requantizing
    k: int                      # output channels / features

    @property
    def requantize(self) -> bool:
        return self.multiplier is not None


def integer_layer(orig, matches: dict, parts: dict, requantize: bool, depthwise: bool = False) -> IntegerLayer:
    """The integer form of one matched layer (module docstring), or NoMatch. `depthwise`: a depthwise conv
    (groups = input channels = output channels) qualifies too (the CPU kernels have one; the mcu's do not)."""
    x = matches[parts["x"]]
    if str(x.ty.dtype) != "uint8" or _value(matches[parts["wz"]]).any():
        raise NoMatch
    w = _value(matches[parts["w"]])
    if w.dtype != np.int8:
        raise NoMatch
    sx, zx = _scalar(matches[parts["xs"]]), _scalar(matches[parts["xz"]])
    sw = _value(matches[parts["ws"]]).astype(np.float32).ravel()
    layer = matches[parts["layer"]]
    conv = layer.attrs if layer.op.name == "relax.nn.conv2d" else None
    if sx is None or zx is None or not (sw > 0).all():
        raise NoMatch
    if conv is not None:
        groups = int(conv.groups)
        if (str(conv.data_layout), str(conv.kernel_layout), str(conv.out_layout)) != ("NCHW", "OIHW", "NCHW") \
                or w.ndim != 4 or (groups != 1 and not (depthwise and w.shape[1] == 1 and groups == w.shape[0])):
            raise NoMatch
        k = int(w.shape[0])
    else:
        w = _matmul_weight(matches.get(parts["perm"]), w)
        k = int(w.shape[1])
    if sw.size not in (1, k):
        raise NoMatch
    bias = np.zeros(k, np.int64)
    if requantize and parts["b"] in matches:
        b = _value(matches[parts["b"]]).astype(np.int64).ravel()
        bs = _value(matches[parts["bs"]]).astype(np.float32).ravel()
        expected = (np.float32(sx) * sw).astype(np.float32)
        if _value(matches[parts["bz"]]).any() or b.size not in (1, k) or not np.array_equal(
                np.broadcast_to(bs, (k,)), np.broadcast_to(expected, (k,))):
            raise NoMatch
        bias = bias + b
    if np.abs(bias - int(zx) * weight_sums(w, conv is not None, k)).max(initial=0) >= 2 ** 31:
        raise NoMatch
    scale = np.broadcast_to((np.float32(sx) * sw).astype(np.float32), (k,)).copy()
    if not requantize:
        return IntegerLayer(x, w, conv, int(zx), bias, scale, None, None, k)
    sy = _scalar(matches[parts["ys"]])
    if sy is None or not sy > 0 or str(orig.ty.dtype) != "uint8":
        raise NoMatch
    multiplier = (scale / np.float32(sy)).astype(np.float32)
    return IntegerLayer(x, w, conv, int(zx), bias, scale, multiplier, matches[parts["yz"]], k)


def relax_form(layer: IntegerLayer):
    """The layer as Relax ops for the CPU kernels: an int32 conv2d of x padded with zx (so the zero-point
    correction −zx·ΣW is a per-channel constant) or matmul, the bias, then requantize or rescale."""
    from tvm import relax  # noqa: PLC0415
    is_conv = layer.conv is not None
    acc = _conv_int32(layer.conv, layer.x, layer.w, layer.zx) if is_conv else \
        relax.op.matmul(layer.x, relax.const(layer.w), out_dtype="int32")
    channel_shape = [1, layer.k, 1, 1] if is_conv else [layer.k]
    bias = layer.bias - layer.zx * weight_sums(layer.w, is_conv, layer.k)
    acc = relax.op.add(acc, relax.const(bias.astype(np.int32).reshape(channel_shape)))
    as_float = relax.op.astype(acc, "float32")
    if not layer.requantize:
        return relax.op.multiply(as_float, relax.const(layer.scale.reshape(channel_shape).copy()))
    scaled = relax.op.multiply(as_float, relax.const(layer.multiplier.reshape(channel_shape).copy()))
    return relax.op.quantize(scaled, relax.const(np.float32(1.0)), layer.zy, axis=-1, out_dtype="uint8")


def _scalar(expr) -> float | None:
    value = _value(expr)
    return value.ravel()[0].item() if value.size == 1 else None


def weight_sums(w: np.ndarray, is_conv: bool, k: int) -> np.ndarray:
    """Σ of each output channel's weights (int64): OIHW over I, H, W; a matmul's [K_in, N] over K_in."""
    w64 = w.astype(np.int64)
    return w64.reshape(k, -1).sum(axis=1) if is_conv else w64.reshape(-1, k).sum(axis=0)


def _conv_int32(attrs, x, w: np.ndarray, zx: int):
    """int32 conv2d of x_u8 (padded with zx) by the int8 weight."""
    from tvm import relax  # noqa: PLC0415
    pads = [int(v) for v in attrs.padding]
    data = x
    if any(pads):
        top, left, bottom, right = pads
        data = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zx))
    return relax.op.nn.conv2d(data, relax.const(w), strides=attrs.strides, padding=[0, 0, 0, 0],
                              dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32")


def _matmul_weight(perm, w: np.ndarray) -> np.ndarray:
    """A matmul's int8 weight as [K_in, N], or NoMatch; `perm`: the matched permute_dims of the weight (a Gemm
    with transB=1), applied here. (The matmul's own argument is the Var bound to it, not the call.)"""
    if w.ndim != 2:
        raise NoMatch
    if perm is not None:
        axes = perm.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            raise NoMatch
        w = np.ascontiguousarray(w.T)
    return w


# ---------------------------------------------------------------------------------------------- legalization

def round_half_even(value, dtype: str):
    """`value` rounded to the nearest integer, ties to even, as an op TVM vectorizes: on LLVM targets the
    `llvm.roundeven` intrinsic (one instruction: vrndscaleps on x86, frintn on aarch64), else `tirx.nearbyint`.
    TVM 0.27's vectorizer cannot widen `tirx.nearbyint`, so a loop calling it ran scalar and LLVM vectorized the
    wrong loop with gathers and scatters (a quantize-dequantize of 1×64×80×80: 0.74 ms, 0.06 ms with the
    intrinsic). Arithmetic forms do not serve: the magic number (v + 1.5·2^23) − 1.5·2^23 is folded back to v by
    TVM's simplifier, and floor-and-fix-the-ties reads v four times, which compounds through every quantize
    inlined into an epilogue (a GELU epilogue of ppocrv6_tiny_det did not finish scheduling)."""
    import tvm  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415
    if is_cpu(tvm.target.Target.current(allow_none=True)):  # the LLVM targets
        return tirx.call_llvm_pure_intrin(dtype, "llvm.roundeven", value)
    return tirx.nearbyint(value)


def legalize_quantize(bb, call):
    """relax.quantize rounding half to even, as ONNX QuantizeLinear does (TVM's legalization rounds half away
    from zero: a value exactly between two steps lands one step above ONNX Runtime's)."""
    from tvm import te, tirx  # noqa: PLC0415
    data, scale, zp = call.args
    out_dtype = str(call.attrs.out_dtype)
    axis = int(call.attrs.axis)
    if "int" not in out_dtype:
        from .common import default_legalization  # noqa: PLC0415
        return default_legalization("relax.quantize")(bb, call)
    info = np.iinfo(np.dtype(out_dtype))
    # x / 1.0 is x exactly (IEEE): `rewrite_qdq`'s requantize passes scale 1.0 (the multiplier is applied
    # before), and a division per output value costs more than the rest of a 1x1 conv's epilogue
    import tvm  # noqa: PLC0415
    unit = isinstance(scale, tvm.ir.GenericConst) and bool((scale.value.numpy() == 1.0).all())

    def compute(x, s, z):
        ndim = len(x.shape)
        ax = axis % ndim if ndim else 0

        def param(t, idx):
            if len(t.shape) == 0:
                return t()
            if all(int(d) == 1 for d in t.shape):
                return t[(0,) * len(t.shape)]
            return t[idx[ax]]

        def body(*idx):
            scaled = x[idx] if unit else divide_exactly(x[idx], param(s, idx).astype(x.dtype))
            value = round_half_even(scaled, str(x.dtype)) + param(z, idx).astype(x.dtype)
            return tirx.max(tirx.min(value, tirx.const(info.max, x.dtype)), tirx.const(info.min, x.dtype)) \
                .astype(out_dtype)
        return te.compute(x.shape, body, name="quantized")

    return bb.call_te(compute, data, scale, zp, primfunc_name_hint="quantize")


def int8_legalizations(fallback: dict) -> dict:
    """Wrap `fallback`'s conv2d / matmul legalizations: int8 operands go to the kernels here."""
    def dispatch(op_name: str, own):
        def legalize(bb, call):
            out = own(bb, call)
            return out if out is not None else fallback[op_name](bb, call)
        return legalize
    table = dict(fallback)
    table["relax.nn.conv2d"] = dispatch("relax.nn.conv2d", legalize_conv2d_int8)
    table["relax.matmul"] = dispatch("relax.matmul", legalize_matmul_int8)
    table["relax.quantize"] = legalize_quantize
    return table


def _int8_operands(call) -> tuple | None:
    """(target, intrinsic, kb, exact) when `call` multiplies uint8 data by a constant int8 weight into int32."""
    import tvm  # noqa: PLC0415
    data, weight = call.args
    if str(data.ty.dtype) != "uint8" or not isinstance(weight, tvm.ir.GenericConst) \
            or str(weight.ty.dtype) != "int8":
        return None
    target = tvm.target.Target.current(allow_none=True)
    found = dot_intrinsic(target)
    return (target, *found) if found else None


def plan_tile(k_blocks: int, width: int, cpu) -> tuple[int, int]:
    """(kv, wt): channel blocks × output columns of the register tile; ≤ the target's accumulator budget."""
    budget = max(4, cpu.accumulators() + (8 if cpu.arch == "x86" else 0) - 4)
    best = (1, 1)
    best_score = -1.0
    for kv in (1, 2, 3, 4):
        if k_blocks % kv:
            continue
        for wt in range(1, min(width, budget // kv) + 1):
            padded = math.ceil(width / wt) * wt
            score = min(kv * wt, 12) * width / padded + 0.01 * kv
            if score > best_score:
                best, best_score = (kv, wt), score
    return best


def pack_weight_int8(w: np.ndarray, kb: int) -> np.ndarray:
    """OIHW int8 → [K/kb, C/4, R, S, kb, 4], zero-padded to whole blocks (zeros add nothing)."""
    k, c, r, s = w.shape
    kp, cp = math.ceil(k / kb) * kb, math.ceil(c / 4) * 4
    full = np.zeros((kp, cp, r, s), np.int8)
    full[:k, :c] = w
    return np.ascontiguousarray(full.reshape(kp // kb, kb, cp // 4, 4, r, s).transpose(0, 2, 4, 5, 1, 3))


def legalize_conv2d_int8(bb, call):
    """uint8 × constant int8 conv2d (NCHW, no padding, groups 1) → packed dot-product kernel; None otherwise."""
    from tvm import relax  # noqa: PLC0415
    from .common import static_shape  # noqa: PLC0415
    found = _int8_operands(call)
    attrs = call.attrs
    data, weight = call.args
    dshape, wshape = static_shape(data), static_shape(weight)
    if found is not None and dshape is not None and wshape is not None and int(attrs.groups) > 1 \
            and wshape[1] == 1 and int(attrs.groups) == dshape[1] == wshape[0] and not any(
            int(p) for p in attrs.padding) and str(attrs.data_layout) == "NCHW":
        return _legalize_depthwise_int8(bb, call, dshape, wshape)
    if found is None or dshape is None or wshape is None or int(attrs.groups) != 1 or any(
            int(p) for p in attrs.padding) or (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NCHW", "OIHW"):
        return None
    target, intrinsic, kb, exact = found
    w = weight.value.numpy()
    if not exact and not pairs_fit(w):
        return None
    n, c, h, wd = dshape
    k, _, r, s = wshape
    sh, sw = (int(v) for v in attrs.strides)
    dh, dw = (int(v) for v in attrs.dilation)
    oh, ow = (h - dh * (r - 1) - 1) // sh + 1, (wd - dw * (s - 1) - 1) // sw + 1
    signed = signed_activations(intrinsic)
    correction = relax.const((128 * w.astype(np.int64).reshape(k, -1).sum(axis=1)).astype(np.int32)) \
        if signed else None
    cpu = describe(target)
    lanes = cpu.lanes("int32")
    if columns_win(c, k, r * s, ow, lanes, kb):  # weight [K, C/4, R, S, 4]: channel blocks of one
        args = [data, relax.const(pack_weight_int8(w, 1).reshape(k, math.ceil(c / 4), r, s, 4))] \
            + ([correction] if signed else [])
        vectors = column_vectors(ow, lanes)
        kv = plan_columns(k, max(4, cpu.registers - 8) // vectors)
        compute = _conv_int8_columns_compute(k, oh, ow, (sh, sw), (dh, dw), kv, lanes, intrinsic + COLUMNS, signed,
                                             vectors)
        return bb.call_te(compute, *args, primfunc_name_hint="conv2d_int8")
    # one input-channel group (an image stem): the dot products are few and the requantizing epilogue is most
    # of the time; a tile of kb channels x 16 columns stores 16 contiguous columns per channel (epilogue over
    # columns) instead of scattering channel vectors across NCHW planes (3->64 3x3/2 pad 1 on 224: 725 -> 517 us,
    # 3->32 3x3/2 on 320: 2729 -> 537 us, 3->64 3x3 on 64x64: 946 -> 166 us; with 16 input channels the
    # channel-vector epilogue stays faster, 1x1 16->64 on 55x55: 134 vs 412 us). A partial last tile puts a
    # bounds check in the epilogue and TVM then stores it element by element (squeezenet's stem,
    # 3->64 3x3/2 on 224 -> 111 columns: 1.25 -> 2.9 ms): only where whole tiles cover the row
    span = ow if ow <= 16 else next((d for d in range(16, 7, -1) if ow % d == 0), None)
    columns = c <= 4 and not signed and span is not None
    kv, wt = (1, span) if columns else plan_tile(math.ceil(k / kb), ow, describe(target))
    args = [data, relax.const(pack_weight_int8(w, kb))] + ([correction] if signed else [])
    compute = _conv_int8_compute(k, oh, ow, (sh, sw), (dh, dw), kv, wt, intrinsic, signed, columns)
    return bb.call_te(compute, *args, primfunc_name_hint="conv2d_int8")


def _legalize_depthwise_int8(bb, call, dshape, wshape):
    """A uint8 × int8 depthwise conv (its input already padded with the zero point) as the float depthwise
    kernel (`conv2d.window_compute`, scheduled by `DepthwiseConv2d`) on integer values: each tap is the uint8
    input converted to float32 times the int8 weight as float32. Products and sums of up to 2^24 / (255·128) =
    513 taps are exact in float32, so the int32 result is the exact integer sum (what ONNX Runtime's QLinearConv
    computes) for any kernel up to 22×22; the layer reads and writes bytes (its input map at a quarter of the
    float traffic) and its requantizing epilogue is the int8 convs'. Larger kernels: TVM's own legalization."""
    from tvm import relax, te  # noqa: PLC0415
    from .common import default_legalization  # noqa: PLC0415
    from .conv2d import window_compute  # noqa: PLC0415
    import tvm  # noqa: PLC0415
    attrs = call.attrs
    n, c, h, w = dshape
    k, _, r, s = wshape
    if r * s > EXACT_FLOAT_TAPS:
        return default_legalization("relax.nn.conv2d")(bb, call)
    sh, sw = (int(v) for v in attrs.strides)
    dh, dw = (int(v) for v in attrs.dilation)
    oh, ow = (h - dh * (r - 1) - 1) // sh + 1, (w - dw * (s - 1) - 1) // sw + 1
    geometry = dict(strides=(sh, sw), dilation=(dh, dw), pad_before=(0, 0), in_hw=(h, w))
    cpu = describe(tvm.target.Target.current(allow_none=True))
    weight = relax.const(call.args[1].value.numpy().astype(np.float32))

    def compute(data, wf):
        acc = window_compute(data, k, oh, ow, (r, s), cpu, geometry,
                             lambda tap, o, ry, rx: tap(o).astype("float32") * wf[o, 0, ry, rx], dtype="float32")
        return te.compute(acc.shape, lambda *i: acc(*i).astype("int32"), name="depthwise_int32")
    return bb.call_te(compute, call.args[0], weight, primfunc_name_hint="depthwise_conv2d_int8")


#: taps of a depthwise kernel whose sums `_legalize_depthwise_int8` computes exactly in float32
EXACT_FLOAT_TAPS = (1 << 24) // (255 * 128)


def _packed_byte(data, b, ch, y, x, signed: bool, likely: bool = False):
    """data[b, ch, y, x] as the dot products read it (x − 128 as int8 for a signed intrinsic), 0 past the last
    channel or column (`likely`: the column bound marked `likely`)."""
    from tvm import tirx  # noqa: PLC0415
    c, w = int(data.shape[1]), int(data.shape[3])
    value = data[b, tirx.min(ch, c - 1), y, tirx.min(x, w - 1)]
    if signed:
        value = (value.astype("int32") - 128).astype("int8")
    inside = x < w
    return tirx.if_then_else(tirx.all(ch < c, tirx.likely(inside) if likely else inside), value,
                             tirx.const(0, "int8" if signed else "uint8"))


def _conv_int8_compute(k: int, oh: int, ow: int, strides, dilation, kv: int, wt: int, intrinsic: str,
                       signed: bool, columns: bool = False):
    def compute(data, packed, correction=None):
        from tvm import te  # noqa: PLC0415
        n, c, h, w = (int(v) for v in data.shape)
        kblocks, c4, r, s, kb, _ = (int(v) for v in packed.shape)
        owp = math.ceil(ow / wt) * wt
        wp = (owp - 1) * strides[1] + (s - 1) * dilation[1] + 1
        dp = te.compute((n, c4, h, wp, 4), lambda b, cc, y, x, ci: _packed_byte(data, b, cc * 4 + ci, y, x, signed),
                        name="pack_int8")
        rc = te.reduce_axis((0, c4), "rc")
        ry = te.reduce_axis((0, r), "ry")
        rx = te.reduce_axis((0, s), "rx")
        ri = te.reduce_axis((0, 4), "ri")

        def body(b, ko, y, x, ki):
            return te.sum(dp[b, rc, y * strides[0] + ry * dilation[0], x * strides[1] + rx * dilation[1], ri]
                          .astype("int32") * packed[ko, rc, ry, rx, ki, ri].astype("int32"), axis=[rc, ry, rx, ri])
        conv = te.compute((n, kblocks, oh, owp, kb), body, name="conv2d_int8",
                          attrs={KERNEL: CONV_INT8, TILE: [kv, 1, wt], "squeeze.intrinsic": intrinsic,
                                 EPILOGUE_COLUMNS: int(columns)})

        def crop(b, o, y, x):
            value = conv[b, o // kb, y, x, o % kb]
            return value + correction[o] if signed else value
        return te.compute((n, k, oh, ow), crop, name="conv2d_int8_out")
    return compute


#: `columns_win`: the channel form's extra cost per output value over the column form's, in dot-product
#: instructions per lane (its epilogue's transposing store to NCHW); measured single layers below
COLUMN_EPILOGUE_GAIN = 0.4


def columns_win(c: int, k: int, taps: int, ow: int, lanes: int, kb: int) -> bool:
    """Whether the column form (`_conv_int8_columns_compute`: lanes over output columns, broadcast weights, the
    epilogue over columns with contiguous NCHW stores) beats the channel form (lanes over kb output channels,
    the epilogue transposing channel vectors into NCHW planes) for a C → K conv with `taps` kernel taps and `ow`
    output columns.

    Each form wastes dot products on its partial tile: the column form on the last column tile (ow rounded up to
    `lanes`), the channel form on the last channel block (K rounded up to kb). The column form wins unless its
    waste exceeds the channel form's by more than the epilogue it saves, `COLUMN_EPILOGUE_GAIN` instructions per
    output value (per 16 lanes: ⌈C/4⌉·taps·(ow'/ow − K'/K) ≤ 16·0.4). Measured (1 thread, one int8 layer with a
    requantizing epilogue, column ÷ channel time): 1×1 32→64 on 80² 0.65, 64→64 on 32² 0.40, 16→8 2×2 on 160²
    0.60, 96→24 on 56² 0.78, 24→144 on 56² 0.83, 48→96 on 40² 0.85, 3→16 3×3/2 on 320² 0.72, 3×3 64→16 on 80²
    0.96, 128→16 on 55² 0.99 (the bound), and where the rule keeps the channel form: 3×3 64→64 on 55² 1.09,
    1×1 64→128 on 20² 1.15, 256→64 on 20² 1.27."""
    if ow < lanes:
        return False
    waste = math.ceil(ow / lanes) * lanes / ow - math.ceil(k / kb) * kb / k
    return math.ceil(c / 4) * taps * waste <= lanes * COLUMN_EPILOGUE_GAIN


def plan_columns(k: int, budget: int) -> int:
    """Output channels per column tile (`column_vectors` accumulators each): the largest divisor of `k` within
    the register `budget` (the registers less 8: 24 of AVX-512's 32, over the tile's column vectors)."""
    return max(d for d in range(1, min(k, budget) + 1) if k % d == 0)


def column_vectors(ow: int, lanes: int) -> int:
    """Column vectors per column tile: 2 where the map's vectors pair up (kv channels × 2 vectors: each weight
    broadcast feeds two dot products, each column load kv/2 … kv of them, where one vector issued a load per dot
    product), else 1 (an odd count would leave a half tile, which the tensorized update cannot take). Measured
    (Intel Xeon, two `vpdpbusd` ports, 1 thread, one process): squeezenet int8's column layers 0.68-0.89 of
    the one-vector tile (16→64 3×3 on 55² 0.336 → 0.300 ms, 16→64 1×1 on 55² 0.065 → 0.044); its stem (7
    vectors) kept one vector and 24 channels, which two vectors of 12 made 1.33× slower."""
    count = math.ceil(ow / lanes)
    return 2 if count >= 2 and count % 2 == 0 else 1


def _conv_int8_columns_compute(k: int, oh: int, ow: int, strides, dilation, kv: int, lanes: int, intrinsic: str,
                               signed: bool, vectors: int = 1):
    """The column form: int32 accumulators [N, K, OH, OW'] whose `lanes` lanes are output columns; the activation
    packed [N, C/4, H, sw, W', 4]: columns split into the stride's sw phases (x = q·sw + p), so that consecutive
    output columns read consecutive packed columns at every kernel tap. Columns past the input are zeros; they
    feed only the cropped columns of the last tile."""
    def compute(data, packed, correction=None):
        from tvm import te  # noqa: PLC0415
        n, c, h, w = (int(v) for v in data.shape)
        _, c4, r, s, _ = (int(v) for v in packed.shape)
        sh, sw = strides
        dh, dw = dilation
        owp = math.ceil(ow / lanes) * lanes
        wq = owp + ((s - 1) * dw) // sw
        # the guard past the right edge marked likely: LoopPartition splits it off and LLVM vectorizes the
        # interleave (unmarked, the pack ran byte by byte: 128→16 on 55² 0.218 → 0.151 ms)
        dp = te.compute((n, c4, h, sw, wq, 4), lambda b, cc, y, p, q, ci: _packed_byte(
            data, b, cc * 4 + ci, y, q * sw + p, signed, likely=True), name="pack_int8")
        rc = te.reduce_axis((0, c4), "rc")
        ry = te.reduce_axis((0, r), "ry")
        rx = te.reduce_axis((0, s), "rx")
        ri = te.reduce_axis((0, 4), "ri")

        def body(b, o, y, x):
            return te.sum(dp[b, rc, y * sh + ry * dh, (rx * dw) % sw, x + (rx * dw) // sw, ri].astype("int32")
                          * packed[o, rc, ry, rx, ri].astype("int32"), axis=[rc, ry, rx, ri])
        conv = te.compute((n, k, oh, owp), body, name="conv2d_int8",
                          attrs={KERNEL: CONV_INT8_COLUMNS, TILE: [kv, 1, lanes], "squeeze.intrinsic": intrinsic,
                                 COLUMN_VECTORS: vectors})

        def crop(b, o, y, x):
            value = conv[b, o, y, x]
            return value + correction[o] if signed else value
        return te.compute((n, k, oh, ow), crop, name="conv2d_int8_out")
    return compute


def legalize_matmul_int8(bb, call):
    """uint8 [..., M, K] × constant int8 [K, N] matmul → packed dot-product kernel; None otherwise."""
    from tvm import relax  # noqa: PLC0415
    from .common import static_shape  # noqa: PLC0415
    found = _int8_operands(call)
    a, b = call.args
    ashape, bshape = static_shape(a), static_shape(b)
    if found is None or ashape is None or bshape is None or len(bshape) != 2 or len(ashape) < 2:
        return None
    target, intrinsic, kb, exact = found
    w = b.value.numpy()
    if not exact and not pairs_fit(np.ascontiguousarray(w.T)):
        return None
    kin, n = bshape
    packed = pack_weight_int8(np.ascontiguousarray(w.T).reshape(n, kin, 1, 1), kb)
    signed = signed_activations(intrinsic)
    m = ashape[-2]
    rows = int(np.prod(ashape[:-1]))
    kv, wt = plan_tile(math.ceil(n / kb), m, describe(target))
    data = relax.op.reshape(a, [1, rows, 1, kin])  # rows as output columns of a 1×1 "conv" on [1, K, 1, rows]
    data = bb.normalize(relax.op.permute_dims(data, [0, 3, 2, 1]))
    correction = relax.const((128 * w.astype(np.int64).sum(axis=0)).astype(np.int32)) if signed else None
    args = [data, relax.const(packed)] + ([correction] if signed else [])
    compute = _conv_int8_compute(n, 1, rows, (1, 1), (1, 1), kv, wt, intrinsic, signed)
    out = bb.emit(bb.call_te(compute, *args, primfunc_name_hint="dense_int8"))
    return relax.op.reshape(relax.op.permute_dims(out, [0, 2, 3, 1]), [*ashape[:-1], n])


# ---------------------------------------------------------------------------------------------- schedule

#: loops above a tile's epilogue: the parallel (batch, channel blocks, rows) loop and the column tiles
TILE_LOOPS = 2


class Int8Kernel:
    """Schedule rule for `conv2d_int8_packed`: a register tile of kv channel blocks × wt output columns, the
    kb × 4 update tensorized with the target's dot-product intrinsic, the requantizing epilogue computed per
    tile (inlined: bias, scale, round, zero point, saturate, NCHW store)."""

    def apply(self, func, target, tunable: bool):
        return self.schedule(func, target)

    def schedule(self, func, target):
        found = kernel_schedule(func, target, CONV_INT8)
        if found is None:
            found = kernel_schedule(func, target, CONV_INT8_COLUMNS)
            return None if found is None else _schedule_columns(*found, target)
        sch, anchor = found
        kv, _, wt = (int(v) for v in sch.get(anchor).annotations[TILE])
        intrinsic = str(sch.get(anchor).annotations["squeeze.intrinsic"])
        lanes = describe(target).lanes("int32")
        work = product(extent(sch, lp) for lp in sch.get_loops(anchor))
        producers = [sch.get(b).name_hint for b in sch.get_producers(anchor)]
        rest = inline_epilogue(sch, anchor)
        epilogue = _tile_epilogue(sch, anchor)
        b, ko, y, x, ki, rc, ry, rx, ri = sch.get_loops(anchor)
        koo, kov = sch.split(ko, [None, kv])
        xo, xi = sch.split(x, [None, wt])
        sch.reorder(b, koo, y, xo, rc, ry, rx, kov, xi, ki, ri)
        outer = sch.fuse(b, koo, y)  # the column tiles a loop of their own, the last one peeled
        peel_partial_tiles(sch, anchor)
        kb = extent(sch, ki)
        columns = bool(int(sch.get(anchor).annotations.get(EPILOGUE_COLUMNS, 0)))
        sch.reverse_compute_at(epilogue, xo, preserve_unit_loops=True)
        if _vectorize_epilogue(sch, epilogue, kb, columns) and wt > 1:
            _stage_epilogue(sch, epilogue, xo)
        if worth_parallel(work):  # before tensorize: the tensorized block is no longer a plain reduction
            mark_parallel(sch, outer)
        init = sch.decompose_reduction(anchor, rc)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(ki, intrinsic)
        sch.set_scope(init, 0, TILE_SCOPE)  # the tile's accumulators, read back by the epilogue
        sch.unroll(xi)
        sch.unroll(kov)
        schedule_rest(sch, producers, rest, lanes, {sch.get(epilogue).name_hint})
        return sch


def _schedule_columns(sch, anchor, target):
    """The column form: a tile of kv output channels × `COLUMN_VECTORS` vectors of `lanes` output columns, one
    accumulator vector per channel and vector; each kernel tap loads the tile's vectors of packed columns and
    multiplies each by kv broadcast weights; the epilogue runs over the columns and stores them contiguously
    (NCHW)."""
    kv, _, lanes = (int(v) for v in sch.get(anchor).annotations[TILE])
    vectors = int(sch.get(anchor).annotations.get(COLUMN_VECTORS, 1))
    intrinsic = str(sch.get(anchor).annotations["squeeze.intrinsic"])
    work = product(extent(sch, lp) for lp in sch.get_loops(anchor))
    producers = [sch.get(b).name_hint for b in sch.get_producers(anchor)]
    rest = inline_epilogue(sch, anchor)
    epilogue = _tile_epilogue(sch, anchor)
    b, o, y, x, rc, ry, rx, ri = sch.get_loops(anchor)
    oo, ov = sch.split(o, [None, kv])
    xo, xv, xi = sch.split(x, [None, vectors, lanes])
    sch.reorder(b, oo, y, xo, rc, ry, rx, ov, xv, xi, ri)
    outer = sch.fuse(b, oo, y)
    peel_partial_tiles(sch, anchor)
    sch.reverse_compute_at(epilogue, xo, preserve_unit_loops=True)
    _vectorize_epilogue(sch, epilogue, lanes * vectors, columns=True)
    if worth_parallel(work):
        mark_parallel(sch, outer)
    init = sch.decompose_reduction(anchor, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(xi, intrinsic)
    sch.set_scope(init, 0, TILE_SCOPE)
    sch.unroll(ov)
    sch.unroll(xv)
    schedule_rest(sch, producers, rest, lanes, {sch.get(epilogue).name_hint})
    return sch


def _tile_epilogue(sch, anchor):
    """The block computed per tile after the int8 kernel: its one consumer (which reads the packed accumulator
    through the channel-block remap, so `common.tile_epilogue`'s in-order test never holds; a broadcast, e.g. an SE
    scale over a map, computes every iteration that reads the tile), unless that consumer has iterations that read
    no tile — a padding (an `if_then_else`: a Pad fused after the layer for the next conv's bottom/right pads) —
    or there are several: then a copy-out.
    Computed per tile, such a consumer's rows and columns past the tile grid were never written (values off by up
    to 255 on ppocrv6_tiny_det's stem once its SAME convs had explicit pads)."""
    consumers = list(sch.get_consumers(anchor))
    if len(consumers) == 1 and not guarded(sch, consumers[0]):
        return consumers[0]
    return sch.cache_write(anchor, 0, TILE_SCOPE)


def _stage_epilogue(sch, consumer, outer) -> None:
    """Store a channel-vector epilogue through a staging tile: the epilogue writes its kv·kb channel vectors whole
    into a local [wt, kv·kb] tile, and a copy writes each channel's wt columns contiguously to the NCHW output.

    Stored straight to NCHW, each channel vector is a scatter over kv·kb planes (`vscatterqps`: ~70 % of a 1×1
    16→64 int8 conv with a hard-swish epilogue, perf). Staged, measured in-model (hot, 1 thread, min of 2 runs):
    ppocrv6_tiny_det's int8 kernels 6.17 → 5.63 ms (32→64 1×1 on 80×80: 0.31 → 0.21 ms; the GELU-epilogue ones,
    where the erf dominates, within ±5 %), squeezenet's 3.36 → 3.13 ms (e2e 4.2 → 4.0 ms); same outputs.
    """
    copy = sch.cache_write(consumer, 0, TILE_SCOPE)
    sch.transform_layout(consumer, ("write", 0), lambda b, c, y, x: (b, y, x, c))
    sch.reverse_compute_at(copy, outer, preserve_unit_loops=True)
    b, c, y, x = sch.get_loops(copy)[TILE_LOOPS:]
    sch.reorder(b, y, c, x)
    sch.vectorize(x)


def _vectorize_epilogue(sch, consumer, kb: int, columns: bool = False) -> bool:
    """Vectorize the requantizing epilogue of one register tile; True where it is vectorized over channels of
    an NCHW output (then `_stage_epilogue` makes its stores contiguous).

    Over the tile's output channels (kb lanes, contiguous in the accumulators) when the epilogue is NCHW
    [1, kv·kb, 1, wt]: over its wt output columns instead, the arithmetic ran wt lanes wide on accumulators
    gathered at stride kb (squeezenet's stem at wt = 3: 2.9 ms, most of it here).
    `columns` (the kb × 16 stem tile): over the columns, channel by channel (contiguous stores).
    Otherwise (a reshaped dense output) its innermost loop.
    """
    loops = sch.get_loops(consumer)
    inner = loops[TILE_LOOPS:]
    extents = [extent(sch, lp) for lp in inner]
    if columns and len(inner) == 4 and None not in extents and extents[0] == 1 and extents[2] == 1:
        b, ch, y, x = inner
        sch.reorder(b, y, ch, x)
        sch.unroll(ch)
        sch.vectorize(x)
        return False
    if len(inner) == 4 and None not in extents and extents[0] == 1 and extents[2] == 1 \
            and extents[1] % kb == 0:
        b, ch, y, x = inner
        ko, ki = sch.split(ch, [None, kb])
        sch.reorder(b, ko, y, x, ki)
        sch.unroll(x)
        sch.vectorize(ki)
        return True
    if (extents[-1] or 1) > 1:
        sch.vectorize(inner[-1])
    return False


def int8_layers(mod) -> int:
    """How many layers `rewrite_qdq` computes in integers in `mod` (0 for a module it never saw)."""
    attrs = getattr(mod, "attrs", None)
    if attrs is None or INT8_LAYERS not in attrs:
        return 0
    return int(attrs[INT8_LAYERS])


def qdq_rewrite_pass():
    """`rewrite_qdq` as a module pass (first in squeeze's CPU pipeline, before FoldConstant turns the
    dequantized weights into float constants)."""
    import tvm  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeRewriteQDQ")
    def _pass(mod, _ctx):
        return rewrite_qdq(mod)
    return _pass


def compute_summary(mod, target, integer: bool = True) -> dict:
    """What a build of `mod` for `target` computes in: {"compute": int8 | mixed | float, "int8_layers",
    "float_layers", "instruction"}, counting Conv/Gemm/MatMul layers after `rewrite_qdq` (the report row field);
    `integer` False: a build without squeeze's pipeline (TVM's own dequantizes: every layer is float)."""
    from tvm import relax  # noqa: PLC0415
    from .conv_transpose import shuffle_pass  # noqa: PLC0415
    found = dot_intrinsic(target) if integer else None
    with target:  # as the pipeline's first passes (fuse_passes): a quantized ConvTranspose becomes a 1×1 conv first
        rewritten = rewrite_qdq(shuffle_pass()(mod), tables=False) if integer else mod
    counts = {"int8": 0, "float": 0}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in (
                "relax.nn.conv2d", "relax.matmul", "relax.nn.conv2d_transpose", "relax.nn.conv1d"):
            counts["int8" if str(expr.args[0].ty.dtype) in ("uint8", "int8") else "float"] += 1

    for func in rewritten.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    label = "int8" if counts["int8"] and not counts["float"] else "mixed" if counts["int8"] else "float"
    return {"compute": label, "int8_layers": counts["int8"], "float_layers": counts["float"],
            "instruction": INSTRUCTIONS.get(found[0], found[0]) if found and counts["int8"] else None}
