"""Tiles to a model's input tensor on the CPU: uint8 NHWC RGB -> float32 ``(x / scale - mean) / std``,
NCHW or NHWC, RGB or BGR, in one compiled pass.

What it does
    Per value, in float32: ``(float32(v) / scale - mean[c]) / std[c]``, channel ``c`` of the
    model's order (BGR reads the tile's channels reversed), written in the model's layout.

Twin and kernel
    :func:`model_input_ref` is the NumPy definition (what ``gpupath.detect.preprocess`` computed:
    a float32 copy, two broadcast passes, a transposed copy). :func:`model_input_cpu` is one
    Numba ``njit(parallel=True)`` pass over (tile, row). Same float32 operations in the same order,
    each correctly rounded: bit-identical to the twin.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["model_input_ref", "model_input_cpu"]


def _check(tiles: Any, mean: Any, std: Any) -> tuple[np.ndarray, np.ndarray]:
    if getattr(tiles, "dtype", None) != np.uint8 or getattr(tiles, "ndim", 0) != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles: expected (N, H, W, 3) uint8, got {getattr(tiles, 'dtype', type(tiles))} "
                         f"{getattr(tiles, 'shape', '')}")
    m, s = np.asarray(mean, np.float32).reshape(-1), np.asarray(std, np.float32).reshape(-1)
    if m.shape != (3,) or s.shape != (3,) or not (s > 0).all():
        raise ValueError(f"mean, std: expected 3 values each, std > 0; got {m.tolist()}, {s.tolist()}")
    return m, s


def model_input_ref(tiles: np.ndarray, *, scale: float, mean: Any, std: Any, nchw: bool, bgr: bool) -> np.ndarray:
    """The NumPy definition (C-contiguous float32)."""
    m, s = _check(tiles, mean, std)
    if bgr:
        tiles = tiles[..., ::-1]
    x = (tiles.astype(np.float32) / np.float32(scale) - m) / s
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if nchw else x)


@functools.cache
def _compiled() -> Any:
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def convert(tiles, scale, mean, std, nchw, bgr, out):
        n, h, w, _ = tiles.shape
        for k in numba.prange(n * h):
            i, y = k // h, k % h
            for x in range(w):
                for c in range(3):
                    v = (np.float32(tiles[i, y, x, 2 - c if bgr else c]) / scale - mean[c]) / std[c]
                    if nchw:
                        out[i, c, y, x] = v
                    else:
                        out[i, y, x, c] = v
        return out

    return convert


def model_input_cpu(tiles: np.ndarray, *, scale: float, mean: Any, std: Any, nchw: bool, bgr: bool) -> np.ndarray:
    """:func:`model_input_ref` in one compiled pass (all cores); bit-identical."""
    m, s = _check(tiles, mean, std)
    n, h, w, _ = tiles.shape
    out = np.empty((n, 3, h, w) if nchw else (n, h, w, 3), np.float32)
    return _compiled()(tiles, np.float32(scale), m, s, nchw, bgr, out)
