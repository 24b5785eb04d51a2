"""Antialiased resampling of tile batches, one code path for NumPy and CuPy.

Each output pixel is a weighted mean of input pixels under a triangle (bilinear) kernel widened
by the downscale factor, so downsampling averages every input pixel (no aliasing) and
upsampling is plain bilinear. The resampling is separable and written as two small matrix
products, which both NumPy and CuPy run as BLAS/cuBLAS calls.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gpupath._xp import array_module

__all__ = ["resize_batch", "resample_weights"]


@functools.lru_cache(maxsize=64)
def resample_weights(in_px: int, out_px: int) -> np.ndarray:
    """(out_px, in_px) float32 matrix whose rows sum to 1; pixel centres aligned (half-pixel convention)."""
    if in_px <= 0 or out_px <= 0:
        raise ValueError(f"sizes must be positive, got in_px={in_px}, out_px={out_px}")
    scale = in_px / out_px
    support = max(scale, 1.0)  # triangle half-width in input px
    centres = (np.arange(out_px) + 0.5) * scale - 0.5
    src = np.arange(in_px)
    dist = np.abs(src[None, :] - centres[:, None]) / support
    weights = np.clip(1.0 - dist, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=64)
def device_weights(device: int, in_px: int, out_px: int) -> Any:
    """:func:`resample_weights` uploaded once per device (not once per batch)."""
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(resample_weights(in_px, out_px))


def resize_batch(batch: Any, out_px: int, out_w: int | None = None) -> Any:
    """Resize RGB tiles.

    Parameters
    ----------
    batch : (N, H, W, 3) uint8, NumPy or CuPy.
    out_px : output height (and width, unless ``out_w`` is given), px.
    out_w : output width, px (default ``out_px``: square tiles).

    Returns
    -------
    (N, out_px, out_w, 3) uint8 on the input's device (the input itself when no resize is needed).
    """
    out_w = out_px if out_w is None else out_w
    n, h, w, c = batch.shape
    if h == out_px and w == out_w:
        return batch
    xp = array_module(batch)
    if xp is np:
        wy, wx = resample_weights(h, out_px), resample_weights(w, out_w)
    else:
        device = xp.cuda.Device().id
        wy, wx = device_weights(device, h, out_px), device_weights(device, w, out_w)
    planes = xp.ascontiguousarray(xp.moveaxis(batch, -1, 1), dtype=xp.float32)  # (N, 3, H, W)
    out = xp.matmul(xp.matmul(wy, planes), wx.T)                    # (N, 3, out, out), batched GEMMs
    return xp.ascontiguousarray(xp.moveaxis(xp.clip(xp.rint(out), 0, 255).astype(xp.uint8), 1, -1))
