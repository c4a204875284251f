"""Integer compute in mcu firmware: a `quant` model's int8 Conv/Gemm/MatMul layers run squeeze's C kernels.

TVM 0.27 has no Cortex-M DSP intrinsics (microTVM's went with it), and its C kernels for a uint8 × int8 → int32
convolution are the float loops with integer types (the accumulator in memory, ~10 instructions a multiply-add
on Cortex-M4). So the layers `schedules.int8` recognises (the same pattern and exactness conditions as on the CPU:
`int8.integer_layer`) become calls of `targets/c/int8_kernels.c` (CMSIS-NN's scheme: an int16 im2col column,
SXTB16 + SMLAD, two output channels × two columns per step), and their int8 weights stay int8 constants in
flash — no decode, no float copy in RAM. Requantization is ONNX Runtime's (float multiplier, round half to even),
so the outputs match its int8 execution of the QDQ model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # schedules import TVM: loaded when a build needs them, not with the target registry
    from .schedules.int8 import IntegerLayer

KERNEL = "squeeze_conv2d_u8s8"
SOURCE = "int8_kernels.c"      # in targets/c/; compiled with -ffp-contract=off (see the file)
# params tensor layout, as the C file's enum
PARAMS = ("N", "C", "H", "W", "O", "OH", "OW", "KH", "KW", "SH", "SW", "PT", "PL", "DH", "DW", "ZX", "ZY",
          "REQUANTIZE", "KP")


def packed_weight(w: np.ndarray) -> np.ndarray:
    """[O, KP] int8 rows (KP = C·KH·KW rounded up to 4, zero tail) with each group of 4 stored as w0 w2 w1 w3:
    what one SXTB16 (bytes 0, 2) and one after a rotation by 8 (bytes 1, 3) widen into the pairs (w0, w1),
    (w2, w3) that the int16 column holds in order."""
    rows = w.reshape(w.shape[0], -1)
    kp = -(-rows.shape[1] // 4) * 4
    out = np.zeros((rows.shape[0], kp), np.int8)
    out[:, :rows.shape[1]] = rows
    return np.ascontiguousarray(out.reshape(rows.shape[0], -1, 4)[:, :, [0, 2, 1, 3]].reshape(rows.shape[0], kp))


def _geometry(layer: IntegerLayer) -> tuple[dict, list[int]]:
    """(params without KP/ZY/REQUANTIZE, output shape) of a conv, or of a matmul as a 1×1 conv on 1×1 images."""
    from .schedules import int8  # noqa: PLC0415
    from .schedules.common import static_shape  # noqa: PLC0415
    shape = static_shape(layer.x)
    if layer.conv is None:
        if shape is None or len(shape) != 2:
            raise int8.NoMatch
        rows, k_in = shape
        return dict(N=rows, C=k_in, H=1, W=1, O=layer.k, OH=1, OW=1, KH=1, KW=1, SH=1, SW=1, PT=0, PL=0, DH=1,
                    DW=1), [rows, layer.k]
    if shape is None or len(shape) != 4:
        raise int8.NoMatch
    n, c, h, w = shape
    _, _, kh, kw = layer.w.shape
    attrs = layer.conv
    (sh, sw), (dh, dw) = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    pt, pl, pb, pr = [int(v) for v in attrs.padding]
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if c != layer.w.shape[1] or oh < 1 or ow < 1:
        raise int8.NoMatch
    return dict(N=n, C=c, H=h, W=w, O=layer.k, OH=oh, OW=ow, KH=kh, KW=kw, SH=sh, SW=sw, PT=pt, PL=pl, DH=dh,
                DW=dw), [n, layer.k, oh, ow]


def kernel_call(layer: IntegerLayer, consumed: list[np.ndarray]):
    """The layer as a call of the C kernel (`int8.rewrite_qdq`'s `form`); its int8 weight joins `consumed`."""
    from tvm import relax  # noqa: PLC0415
    params, out_shape = _geometry(layer)
    w = layer.w if layer.conv is not None else np.ascontiguousarray(layer.w.T)  # [O, K_in]
    packed = packed_weight(w)
    zy = int(layer.zy.value.numpy().ravel()[0]) if layer.requantize else 0
    params.update(ZX=layer.zx, ZY=zy, REQUANTIZE=int(layer.requantize), KP=packed.shape[1])
    factor = layer.multiplier if layer.requantize else layer.scale
    consumed.append(layer.w)
    args = [layer.x, relax.const(packed), relax.const(layer.bias.astype(np.int32)),
            relax.const(factor.astype(np.float32)), relax.const(np.array([params[k] for k in PARAMS], np.int32))]
    out = relax.TensorType(out_shape, "uint8" if layer.requantize else "float32")
    return relax.call_dps_packed(KERNEL, args, out)


def rewrite(mod) -> tuple[object, list[np.ndarray]]:
    """(`mod` with its quantized layers as kernel calls, the int8 weights those layers read)."""
    from .schedules import int8  # noqa: PLC0415
    consumed: list[np.ndarray] = []
    return int8.rewrite_qdq(mod, form=lambda layer: kernel_call(layer, consumed)), consumed


def im2col_bytes(program) -> int:
    """The int16 column buffer the C kernels need: two columns of the largest KP over `program`'s calls."""
    consts = {c.key: c for c in program.consts}
    kp = [int(consts[args[4]].data[PARAMS.index("KP")]) for kernel, args in program.calls if kernel == KERNEL]
    return 4 * max(kp, default=0)


def table_consts(program) -> set[str]:
    """Keys of the constants the kernels read besides their weights (bias, multipliers, params): tables."""
    return {key for kernel, args in program.calls if kernel == KERNEL for key in args[2:5]}


def weight_consts(program) -> set[str]:
    """Keys of the packed int8 weights of the kernels' calls."""
    return {args[1] for kernel, args in program.calls if kernel == KERNEL}
