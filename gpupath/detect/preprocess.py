"""Model-input preprocessing: RGB tiles -> the normalised tensor a learned detector takes.

Takes a batch of tiles ``(N, H, W, 3)`` uint8 RGB (NumPy or CuPy) and an
:class:`~gpupath.detect.card.InputSpec`, and returns the model input on the same device:

1. resize to ``spec.size_px`` (fixed-size models only) with the antialiased triangle filter of
   :func:`gpupath._resize.resize_batch` (half-pixel centres, result rounded to uint8);
2. swap the channels to BGR when the model wants them;
3. normalise in float32: ``x = (pixel / scale - mean) / std``;
4. transpose to NCHW when asked, cast to float32 or float16, C-contiguous.

This is the reference implementation: :class:`gpupath.detect.dali_feed.DaliPreprocessor` runs
the same steps as a DALI pipeline and is tested against it. :func:`input_scale` gives the
model-input px per tile px that box decoders need to map boxes back to tile px.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gpupath._resize import resize_batch
from gpupath_kernels.model_input import model_input_cpu
from gpupath._xp import array_module, is_device_array
from gpupath.detect.card import InputSpec

__all__ = ["input_scale", "output_shape", "preprocess"]


def input_scale(spec: InputSpec, tile_px: int | tuple[int, int]) -> tuple[float, float]:
    """Model-input px per tile px along y and x.

    Parameters
    ----------
    spec : the model input.
    tile_px : tile edge, px (square tiles), or (height, width) px.

    Returns
    -------
    (sy, sx) : model-input px per tile px; ``(1.0, 1.0)`` when the model takes tiles as they are
        (``size_px`` is None or equals the tile size). A box at model-input ``(x, y)`` lies at
        tile ``(x / sx, y / sy)``.

    Raises
    ------
    ValueError
        A tile size that is not positive.
    """
    tile_h, tile_w = (tile_px, tile_px) if isinstance(tile_px, int | np.integer) else tile_px
    if tile_h <= 0 or tile_w <= 0:
        raise ValueError(f"tile size must be positive px, got {tile_px!r}")
    if spec.size_px is None:
        return 1.0, 1.0
    out_h, out_w = spec.size_px
    return out_h / tile_h, out_w / tile_w


def output_shape(spec: InputSpec, n: int, tile_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Shape of :func:`preprocess`'s result for ``n`` tiles of ``tile_hw`` = (height, width) px."""
    out_h, out_w = spec.size_px if spec.size_px is not None else tile_hw
    return (n, 3, out_h, out_w) if spec.layout == "NCHW" else (n, out_h, out_w, 3)


def check_tiles(tiles: Any, spec: InputSpec) -> Any:
    """Validate a tile batch for ``spec``; return it as an array (NumPy unless it is on the device).

    Raises
    ------
    TypeError
        ``spec`` is not an InputSpec, or the tiles are not uint8.
    ValueError
        Tiles not shaped (N, H, W, 3), empty tiles, or (for any-size models) H, W not multiples
        of ``spec.multiple_of``.
    """
    if not isinstance(spec, InputSpec):
        raise TypeError(f"spec must be an InputSpec, got {type(spec).__name__}")
    if not is_device_array(tiles):
        tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be (N, H, W, 3) RGB, got shape {tuple(tiles.shape)}")
    if tiles.dtype != np.uint8:
        raise TypeError(f"tiles must be uint8 RGB, got dtype {tiles.dtype}")
    _, h, w, _ = tiles.shape
    if h == 0 or w == 0:
        raise ValueError(f"tiles must have positive height and width, got shape {tuple(tiles.shape)}")
    m = spec.multiple_of
    if spec.size_px is None and (h % m or w % m):
        raise ValueError(f"model input {spec.name!r} needs height and width multiples of {m} px, "
                         f"got tiles of {h}x{w} px")
    return tiles


def _device_id(tiles: Any) -> int:
    return int(tiles.device.id) if is_device_array(tiles) else -1


@functools.lru_cache(maxsize=32)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], xp: Any, device_id: int) -> tuple[Any, Any]:
    """(3,) float32 mean and std on the tiles' device, uploaded once per device (not per batch)."""
    return xp.asarray(mean, dtype=xp.float32), xp.asarray(std, dtype=xp.float32)


def preprocess(tiles: Any, spec: InputSpec) -> Any:
    """Turn RGB tiles into the model-input tensor of ``spec``.

    Parameters
    ----------
    tiles : (N, H, W, 3) uint8 RGB, NumPy or CuPy.
    spec : the model input (size, channel order, normalisation, layout, dtype).

    Returns
    -------
    (N, 3, h, w) for ``layout="NCHW"`` or (N, h, w, 3) for ``"NHWC"``, ``spec.dtype``,
    C-contiguous, on the input's device. ``(h, w) = spec.size_px`` when set, else ``(H, W)``.
    Values are ``(pixel / scale - mean) / std`` per channel (in the model's channel order).

    Raises
    ------
    TypeError
        ``spec`` is not an InputSpec, or the tiles are not uint8.
    ValueError
        Tiles not shaped (N, H, W, 3), with zero height or width, or (``size_px`` None) with a
        height or width that is not a multiple of ``spec.multiple_of``.

    Notes
    -----
    The resize (only when ``size_px`` differs from (H, W)) is the separable antialiased triangle
    filter of :func:`gpupath._resize.resize_batch`, rounded back to uint8 as a decoded image
    would be; normalisation is computed in float32 and cast to ``spec.dtype`` last.

    Examples
    --------
    >>> spec = InputSpec(name="tiles", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    >>> preprocess(np.full((2, 8, 8, 3), 255, np.uint8), spec).shape
    (2, 3, 8, 8)
    """
    tiles = check_tiles(tiles, spec)
    xp = array_module(tiles)
    _, h, w, _ = tiles.shape
    if spec.size_px is not None and tuple(spec.size_px) != (h, w):
        tiles = resize_batch(tiles, *spec.size_px)
    if xp is np:  # one compiled pass; bit-identical to the expressions below
        x = model_input_cpu(tiles, scale=spec.scale, mean=spec.mean, std=spec.std, nchw=spec.layout == "NCHW",
                            bgr=spec.channels == "BGR")
        return x if spec.dtype == "float32" else x.astype(spec.dtype, order="C")
    if spec.channels == "BGR":
        tiles = tiles[..., ::-1]
    mean, std = _constants(spec.mean, spec.std, xp, _device_id(tiles))
    x = (tiles.astype(xp.float32) / xp.float32(spec.scale) - mean) / std   # (N, h, w, 3) float32
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return x.astype(spec.dtype, order="C")
