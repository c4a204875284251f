"""Convolution input windows (im2col) for the passes that fit or measure a Conv from its input activations:
the ONNX padding rules, a strided view of every window, and the rows of sampled output positions."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view


def auto_pad(node: gs.Node) -> str:
    """A Conv's or ConvTranspose's `auto_pad` as text (`NOTSET` when absent; exporters write str or bytes)."""
    auto = node.attrs.get("auto_pad", "NOTSET")
    return auto.decode() if isinstance(auto, bytes) else auto


def fixed_pads(node: gs.Node, d: int) -> list[int] | None:
    """The pads (begins, then ends) of a conv whose padding does not depend on its input size: `pads` (zeros when
    absent or `auto_pad=VALID`); None for `SAME_UPPER`/`SAME_LOWER`."""
    auto = auto_pad(node)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return None
    return [0] * (2 * d) if auto == "VALID" else [int(p) for p in node.attrs.get("pads", [0] * (2 * d))]


def conv_pads(node: gs.Node, size, kernel, strides, dil) -> list[int]:
    """A Conv's pads (all begins, then all ends) for input spatial `size`, `auto_pad` resolved as ONNX defines it."""
    d = len(kernel)
    auto = auto_pad(node)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(d):
            out = -(-size[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - size[i])
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    return fixed_pads(node, d)


def conv_windows(node: gs.Node, x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """Sliding windows [N, C, *output positions, *kernel] of the padded input (a view, no copy)."""
    d = len(kernel)
    strides = list(node.attrs.get("strides", [1] * d))
    dil = list(node.attrs.get("dilations", [1] * d))
    pads = conv_pads(node, x.shape[2:], kernel, strides, dil)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    eff = [dil[i] * (kernel[i] - 1) + 1 for i in range(d)]
    win = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + d)))
    win = win[(Ellipsis,) + tuple(slice(None, None, s) for s in dil)]
    return win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]


def window_rows(windows: np.ndarray, images: np.ndarray, picks: np.ndarray, spatial) -> tuple[np.ndarray, tuple]:
    """The windows at flat output positions `picks` (over `images` × `spatial`), as [R, C, *kernel], and where
    they are: (the image of each row, then its position along each spatial axis)."""
    per_image = int(np.prod(spatial))
    n_idx = images[picks // per_image]
    pos = np.unravel_index(picks % per_image, spatial)
    return windows[(n_idx, slice(None)) + tuple(pos)], (n_idx, *pos)
