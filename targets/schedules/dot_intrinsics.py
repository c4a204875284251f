"""The int8 dot products squeeze's int8 kernels (`int8.py`) tensorize with, as TVM tensor intrinsics registered
here: C[lanes] += Σ_k<4 u8·s8 in the channel form (4 input bytes broadcast, a vector of weights per lane) and the
column form (a vector of 4-byte input columns, one channel's 4 weights broadcast), and `dot_intrinsic`, which picks
the target's best (the table in `int8.py`'s docstring).
"""
from __future__ import annotations

import numpy as np

from .simd import cpu_features, is_cpu


def _x86_dot_ops(lanes: int) -> tuple[str, str, str]:
    """LLVM's x86 byte dot products at `lanes` int32 lanes (16: AVX-512, 8: AVX2 / AVX-VNNI): vpdpbusd,
    vpmaddubsw, vpmaddwd."""
    if lanes == 16:
        return "llvm.x86.avx512.vpdpbusd.512", "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"
    return "llvm.x86.avx512.vpdpbusd.256", "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"


def _dot_intrinsic(lanes: int, kind: str):
    """(description, implementation) of C[lanes] += Σ_k u8 A[k] · s8 B[lanes, k] over k < 4 on x86.

    `vnni`: one `vpdpbusd` (LLVM ≥ 20 declares its byte operands as <N x i8>, which TVM 0.27's own
    `dot_16x4_vnni` does not, and LLVM rejects it); `pmadd`: `vpmaddubsw` + `vpmaddwd` by ones.
    """
    from tvm.script import tirx as T  # noqa: PLC0415
    nbytes = lanes * 4
    i32, u8, i8, i16 = f"int32x{lanes}", f"uint8x{nbytes}", f"int8x{nbytes}", f"int16x{lanes * 2}"
    vnni, maddubs, maddwd = _x86_dot_ops(lanes)

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def dot_vnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                 C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=u8)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(vnni), C.vload([0], dtype=i32), a, B.vload([0, 0], dtype=i8), dtype=i32)

    @T.prim_func(s_tir=True)
    def dot_pmadd(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                  C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=u8)
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(maddubs), a, B.vload([0, 0], dtype=i8),
                                            dtype=i16)
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddwd), pairs, T.broadcast(T.int16(1), lanes * 2), dtype=i32)

    return desc, dot_vnni if kind == "vnni" else dot_pmadd


def _dot_columns_intrinsic(lanes: int, kind: str):
    """(description, implementation) of C[lanes] += Σ_k A[lanes, k] · B[k] over k < 4: the column form, where the
    lanes are `lanes` output columns (4 input channels each, contiguous in the packed activation) and the 4 weight
    bytes of one output channel are broadcast. x86 (`vnni`, `pmadd`): u8 activations × s8 weights, as
    `_dot_intrinsic`; `sdot`: s8 × s8 on aarch64 (lanes 4)."""
    from tvm.script import tirx as T  # noqa: PLC0415
    nbytes = lanes * 4
    act = "int8" if kind == "sdot" else "uint8"
    i32, a8, i8, i16 = f"int32x{lanes}", f"{act}x{nbytes}", f"int8x{nbytes}", f"int16x{lanes * 2}"
    vnni, maddubs, maddwd = _x86_dot_ops(lanes)

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes, 4), act, offset_factor=1), B: T.Buffer((4,), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes, 4), act, offset_factor=1), B: T.Buffer((4,), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            b = T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), lanes), dtype=i8)
            if kind == "vnni":
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(vnni), C.vload([0], dtype=i32), A.vload([0, 0], dtype=a8), b,
                    dtype=i32)
            elif kind == "pmadd":
                pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(maddubs), A.vload([0, 0], dtype=a8), b,
                                                dtype=i16)
                C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(maddwd), pairs, T.broadcast(T.int16(1), lanes * 2), dtype=i32)
            else:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], dtype=i32),
                    A.vload([0, 0], dtype=a8), b, dtype=i32)

    return desc, impl


def _sdot_intrinsic():
    """(description, implementation) of C[4] += Σ_k s8 A[k] · s8 B[4, k] over k < 4: one aarch64 `sdot`."""
    from tvm.script import tirx as T  # noqa: PLC0415

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
             C: T.Buffer((4,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
             C: T.Buffer((4,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], dtype="int32x4"),
                a, B.vload([0, 0], dtype="int8x16"), dtype="int32x4")

    return desc, impl


#: name → (output lanes, kind) of squeeze's x86 dot-product intrinsics
X86_INTRINSICS = {"squeeze_dot_16x4_vnni": (16, "vnni"), "squeeze_dot_8x4_avxvnni": (8, "vnni"),
                  "squeeze_dot_16x4_avx512bw": (16, "pmadd"), "squeeze_dot_8x4_avx2": (8, "pmadd")}


def _register_intrinsics() -> None:
    """Register squeeze's x86 dot products (`X86_INTRINSICS`) once per process."""
    from tvm.s_tir import TensorIntrin  # noqa: PLC0415
    if _registered():
        return
    for name, (lanes, kind) in X86_INTRINSICS.items():
        TensorIntrin.register(name, *_dot_intrinsic(lanes, kind))
        TensorIntrin.register(name + COLUMNS, *_dot_columns_intrinsic(lanes, kind))
    TensorIntrin.register(SDOT, *_sdot_intrinsic())
    TensorIntrin.register(SDOT + COLUMNS, *_dot_columns_intrinsic(4, "sdot"))


SDOT = "squeeze_dot_4x4_i8i8s32_sdot"
COLUMNS = "_columns"  #: suffix of each intrinsic's column form (`_dot_columns_intrinsic`)


def _registered() -> bool:
    from tvm.s_tir import TensorIntrin  # noqa: PLC0415
    try:
        TensorIntrin.get("squeeze_dot_8x4_avx2")
        return True
    except Exception:  # noqa: BLE001 (TVM raises a plain error for an unknown name)
        return False


def dot_intrinsic(target) -> tuple[str, int, bool] | None:
    """(tensor intrinsic, output lanes kb, exact for any weights) for `target`'s best int8 dot product; None
    where it has none (then QDQ layers stay float).

    The features come from LLVM's view of the target (`-mcpu` / `-mattr`), so a cross build for aarch64 with
    `+dotprod` gets `sdot` and a host build gets what this CPU has.
    """
    if not is_cpu(target):
        return None
    _register_intrinsics()
    features = cpu_features(target)
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")):
        return (SDOT, 4, True) if "dotprod" in features else None
    if "avx512vnni" in features and "avx512bw" in features:
        return "squeeze_dot_16x4_vnni", 16, True
    if "avxvnni" in features:
        return "squeeze_dot_8x4_avxvnni", 8, True
    if "avx512bw" in features:
        return "squeeze_dot_16x4_avx512bw", 16, False
    if "avx2" in features:
        return "squeeze_dot_8x4_avx2", 8, False
    return None


def signed_activations(intrinsic: str) -> bool:
    """Whether the intrinsic multiplies signed bytes (sdot): activations are then packed as x − 128."""
    return "i8i8" in intrinsic


def pairs_fit(weight: np.ndarray) -> bool:
    """Whether `vpmaddubsw` is exact on `weight` [K, C, taps...] (a conv's OIHW, or a dense weight [N, K]) once
    packed in fours of input channels per tap (`int8.pack_weight_int8`): |w₀|+|w₁| ≤ 128 for each pair of
    consecutive input channels at one tap, which it adds into one saturating int16 (255·128 = 32640 ≤ 32767).
    The packing pads C with zeros to a multiple of 4."""
    w = np.abs(weight.astype(np.int32))
    if w.shape[1] % 2:
        w = np.concatenate([w, np.zeros_like(w[:, :1])], axis=1)
    return bool((w.reshape(w.shape[0], w.shape[1] // 2, 2, -1).sum(axis=2) <= 128).all())


#: dot-product intrinsic → the instruction the report names
INSTRUCTIONS = {"squeeze_dot_16x4_vnni": "vpdpbusd (AVX-512 VNNI)", "squeeze_dot_8x4_avxvnni": "vpdpbusd (AVX-VNNI)",
                 "squeeze_dot_16x4_avx512bw": "vpmaddubsw (AVX-512BW)", "squeeze_dot_8x4_avx2": "vpmaddubsw (AVX2)",
                 SDOT: "sdot (aarch64 dotprod)"}
