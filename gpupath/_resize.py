"""Antialiased resampling of tile batches, one code path for NumPy and CuPy.

Each output pixel is a weighted mean of input pixels under a triangle (bilinear) kernel widened
by the downscale factor, so downsampling averages every input pixel (no aliasing) and
upsampling is plain bilinear. The resampling is separable. On the device it is two small matrix
products (cuBLAS GEMMs); on the host the compiled kernel of ``gpupath_kernels.resample`` reads only
the few non-zero taps of each weight row (within 1 grey level of the matrix products, its twin).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gpupath._xp import array_module
from gpupath_kernels.resample import resize_cpu, triangle_weights

__all__ = ["resize_batch", "resample_weights"]


def resample_weights(in_px: int, out_px: int) -> np.ndarray:
    """(out_px, in_px) float32 matrix whose rows sum to 1; pixel centres aligned (half-pixel convention)."""
    return triangle_weights(in_px, out_px)


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
    if xp is np:  # the compiled CPU kernel: only the filter's few non-zero taps per output pixel
        return resize_cpu(batch, out_px, out_w)
    device = xp.cuda.Device().id
    wy, wx = device_weights(device, h, out_px), device_weights(device, w, out_w)
    planes = xp.ascontiguousarray(xp.moveaxis(batch, -1, 1), dtype=xp.float32)  # (N, 3, H, W)
    out = xp.matmul(xp.matmul(wy, planes), wx.T)                    # (N, 3, out, out), batched GEMMs
    return xp.ascontiguousarray(xp.moveaxis(xp.clip(xp.rint(out), 0, 255).astype(xp.uint8), 1, -1))
