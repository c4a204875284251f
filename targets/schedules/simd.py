"""What the schedule rules need to know about a CPU target: SIMD width, registers, cores.

`tvm.target.codegen.llvm_get_vector_width` answers 512 for any x86 CPU in TVM 0.27 (even `haswell`), so the
width is read from the CPU's feature list instead: AVX-512 → 512 bits, AVX/AVX2 → 256, otherwise 128 (SSE,
NEON on ARM). AMD Zen 4 (`znver4`) runs a 512-bit FMA as two 256-bit halves: per lane, 256-bit vectors are as
fast there, so a narrower channel block that pads fewer channels costs nothing. On AMD Zen 1-3 (AVX2) a scalar
broadcast competes with the FMAs (`BROADCAST_SLOTS`): the pointwise tiles then spread each broadcast over several
channel blocks, and the column tiles, which broadcast a weight per FMA, are not used for 1×1 convs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Cpu:
    """The facts a rule plans with: vector bits, vector registers, FMA units, whether it is a CPU at all."""

    vector_bits: int
    registers: int
    fma: bool
    arch: str
    full_rate_bits: int = 0  #: widest vector the FMA units take at full per-lane rate (0: vector_bits)
    broadcast_slots: float = 0.0  #: FMA issue slots a scalar broadcast from memory costs (`BROADCAST_SLOTS`)
    step_cycles: float = 1.0  #: cycles a pointwise tile's reduction step spends beside its FMAs and loads

    def lanes(self, dtype: str = "float32") -> int:
        """Elements of `dtype` in one SIMD register."""
        return max(1, self.vector_bits // dtype_bits(dtype))

    def full_rate_lanes(self, dtype: str = "float32") -> int:
        """Lanes of `dtype` in the widest vector that costs no more per lane than a narrower one."""
        return max(1, min(self.full_rate_bits or self.vector_bits, self.vector_bits) // dtype_bits(dtype))

    def accumulators(self) -> int:
        """Vector registers a register tile may hold as accumulators (the rest: operands, addresses).

        At most 16 on x86: for a stride-1 convolution LLVM unrolls the kernel-width loop and loads each input
        scalar once for all the taps that read it, so a tile also keeps ht·(wt + s - 1) broadcasts live. With
        22-24 accumulators of AVX-512's 32 registers that spills on every step (mnist_burn's 16→24 3×3 conv on
        22×22: tile 1×22 75 µs, 1×11 49 µs; 8→16 on 24×24: 1×24 24 µs, 2×8 15 µs; 1 thread); tiles of
        16 were within noise of the best on every 3×3 conv of cifar10_resnet4b and sri_resnet_a.
        """
        spare = max(4, self.registers - 8)
        return min(16, spare) if self.arch == "x86" else spare


def dtype_bits(dtype: str) -> int:
    """Bits of one element of `dtype` ("float32" → 32)."""
    return int("".join(ch for ch in dtype if ch.isdigit()) or 32)


@lru_cache(maxsize=None)
def _features(target_json: str) -> frozenset[str]:
    import tvm  # noqa: PLC0415
    from tvm.target import codegen  # noqa: PLC0415
    try:
        return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(target_json)))
    except Exception:  # noqa: BLE001 (LLVM without this triple's backend: the baseline of the architecture)
        return frozenset()


def cpu_features(target) -> frozenset[str]:
    """LLVM's feature names for a `tvm.target.Target` of kind llvm (`-mcpu` / `-mattr`; none where this LLVM lacks
    the triple's backend), asked once per target."""
    return _features(str(target))


#: CPUs (LLVM -mcpu) whose scalar broadcast to a vector register competes with the FMAs for the floating-point
#: pipes, unlike Intel's, which broadcast in the load port: AMD Zen 1-3 (AVX2). Zen 4 is modelled by its
#: double-pumped 512-bit FMAs (`full_rate_bits`) instead.
FP_BROADCAST_CPUS = frozenset({"znver1", "znver2", "znver3"})
#: the FMA slots one broadcast costs there, fitted to squeezenet's 1×1 convs on Zen 3 (1 thread, 7 interleaved
#: rounds, alone, ms; ONNX Runtime in brackets): 512→1000 on 13×13, one 8-channel block × 1×13 6.39, 1 × 1×8 6.30,
#: 2 × 1×5 4.12, 2 × 2×3 3.69, 3 × 1×3 3.92, 3 × 1×4 3.56, 4 × 1×2 3.53 (3.16); 64→256 on 13×13, 2 × 2×2 0.186,
#: 1 × 1×13 0.223, 3 × 1×4 0.107, 4 × 1×2 0.111 (0.130): a tile of one block (a broadcast per FMA) runs at half
#: the rate of one of three or four. With 1 slot `pointwise_rate` put them within 25 %; with 2 slots and 3 cycles
#: a step (`FP_BROADCAST_STEP_CYCLES`, not 1: tiles of 6-9 accumulators ran slower than their FMA slots, 64→256,
#: 3 × 1×2 0.154) it ranks them as measured but for 3 × 1×3
BROADCAST_SLOTS = 2.0
FP_BROADCAST_STEP_CYCLES = 3.0


@lru_cache(maxsize=None)
def _describe(target_json: str) -> Cpu:
    import tvm  # noqa: PLC0415
    target = tvm.target.Target(target_json)
    triple = str(target.attrs.get("mtriple", "") or "")
    features = _features(target_json)
    if "avx512f" in features:
        double_pumped = str(target.attrs.get("mcpu", "") or "") == "znver4"
        return Cpu(512, 32, True, "x86", 256 if double_pumped else 512)
    if "avx2" in features or "avx" in features:
        if str(target.attrs.get("mcpu", "") or "") in FP_BROADCAST_CPUS:
            return Cpu(256, 16, "fma" in features, "x86", broadcast_slots=BROADCAST_SLOTS,
                       step_cycles=FP_BROADCAST_STEP_CYCLES)
        return Cpu(256, 16, "fma" in features, "x86")
    if triple.startswith(("aarch64", "arm64")) or "neon" in features:
        return Cpu(128, 32, True, "arm")
    if triple.startswith("arm"):
        return Cpu(128, 16, "vfp4" in features, "arm")
    return Cpu(128, 16, False, "x86" if not triple else triple.split("-")[0])


def describe(target) -> Cpu:
    """The `Cpu` for a `tvm.target.Target` of kind llvm."""
    return _describe(str(target))


def is_cpu(target) -> bool:
    return target is not None and target.kind.name == "llvm"
