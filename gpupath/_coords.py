"""The one conversion between level pixels and level-0 pixels.

A level-0 position ``x`` lies in level-``L`` pixel ``floor(x / downsample[L])`` (as in OpenSlide
and cuCIM). The inverse used to *request* a level pixel from a reader that takes level-0
coordinates is the smallest level-0 px that maps onto it, ``ceil(x_lvl * downsample)``: exact for
integer downsamples and never one level pixel off for fractional ones (OpenSlide's 4.016...).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["level_px", "level0_origin", "pyramid_downsamples"]

_EPS = 1e-9  # float slack: x_lvl * ds may land a hair above an exact integer


def level_px(x: int | float, downsample: float) -> int:
    """Level pixel holding level-0 position ``x``."""
    return math.floor(x / downsample)


def level0_origin(x_lvl: int | np.ndarray, downsample: float) -> int | np.ndarray:
    """Smallest level-0 px whose level pixel is ``x_lvl`` (int or int array)."""
    if isinstance(x_lvl, np.ndarray):
        return np.ceil(x_lvl * downsample - _EPS).astype(np.int64)
    return math.ceil(x_lvl * downsample - _EPS)


def pyramid_downsamples(level_dims: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """Level downsamples as OpenSlide computes them: mean of the width and height ratios to level 0."""
    w0, h0 = level_dims[0]
    return tuple((w0 / w + h0 / h) / 2.0 for w, h in level_dims)
