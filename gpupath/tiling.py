"""Tile grid at a target resolution, filtered by the tissue mask.

Takes slide geometry (level-0 size, mpp, level downsamples) and a :class:`TissueMask`; returns
a :class:`TileGrid` of square tiles of ``tile_px`` pixels at ``target_mpp`` with ``overlap_px``
pixels shared between neighbours. Everything stored is level-0 px: tile ``i`` covers
``[x[i], x[i] + size_l0_px) x [y[i], y[i] + size_l0_px)``. The grid covers the whole slide;
tiles at the right and bottom edges may reach past it (read as white glass).

Host only: the grid is small (one row per tile) and is computed once per slide.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gpupath.errors import ConfigError
from gpupath.tissue import TissueMask

__all__ = ["TileSpec", "TileGrid", "tile_grid", "tile_level"]


@dataclass(frozen=True, slots=True)
class TileSpec:
    """What tiles to make: size and overlap in px at ``target_mpp``, and the tissue needed to keep one."""

    tile_px: int = 256
    overlap_px: int = 0
    target_mpp: float = 0.5      # µm/px of the tiles handed to stages
    min_tissue: float = 0.05     # fraction of a tile's area that must be tissue

    def __post_init__(self) -> None:
        if self.tile_px < 16:
            raise ConfigError(f"tile_px must be >= 16, got {self.tile_px}")
        if not 0 <= self.overlap_px < self.tile_px // 2:
            raise ConfigError(f"overlap_px must be in [0, tile_px/2), got {self.overlap_px} for tile_px {self.tile_px}")
        if not (self.target_mpp > 0 and math.isfinite(self.target_mpp)):
            raise ConfigError(f"target_mpp must be a positive number of µm/px, got {self.target_mpp}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Tiles to process (level-0 px), and how to read them."""

    x: np.ndarray                  # (N,) int64 level-0 px, left (inclusive)
    y: np.ndarray                  # (N,) int64 level-0 px, top (inclusive)
    tissue_fraction: np.ndarray    # (N,) float32 in [0, 1]
    col: np.ndarray                # (N,) int32 grid column
    row: np.ndarray                # (N,) int32 grid row
    n_cols: int
    n_rows: int
    size_l0_px: int                # level-0 extent of a tile edge
    stride_l0_px: int              # level-0 distance between neighbouring tile origins
    tile_px: int                   # tile edge at tile_mpp, px
    tile_mpp: float                # actual µm/px of the tiles (size_l0_px * mpp / tile_px)
    level: int                     # pyramid level read
    read_px: int                   # region edge read at ``level`` before resizing to tile_px

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def overlap_l0_px(self) -> int:
        return self.size_l0_px - self.stride_l0_px

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Index arrays of consecutive tiles, ``batch_size`` at most each."""
        for start in range(0, len(self), batch_size):
            yield np.arange(start, min(start + batch_size, len(self)))


def tile_level(level_downsamples: tuple[float, ...], size_l0_px: int, tile_px: int) -> tuple[int, int]:
    """Coarsest level at least as fine as the tiles, and the region edge (px) to read there."""
    needed = size_l0_px / tile_px
    level = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= needed * 1.005:
            level = i
    return level, max(1, int(round(size_l0_px / level_downsamples[level])))


def _tissue_fractions(mask: TissueMask, x: np.ndarray, y: np.ndarray, size_l0: int) -> np.ndarray:
    """Mean of the mask over each tile's footprint, from a summed-area table (exact per mask px)."""
    m = mask.mask.astype(np.int64)
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    ds = mask.downsample
    c0 = np.clip(np.floor(x / ds).astype(np.int64), 0, m.shape[1])
    c1 = np.clip(np.ceil((x + size_l0) / ds).astype(np.int64), 0, m.shape[1])
    r0 = np.clip(np.floor(y / ds).astype(np.int64), 0, m.shape[0])
    r1 = np.clip(np.ceil((y + size_l0) / ds).astype(np.int64), 0, m.shape[0])
    total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    return (total / area).astype(np.float32)


def tile_grid(dimensions: tuple[int, int], mpp: float, level_downsamples: tuple[float, ...],
              mask: TissueMask, spec: TileSpec) -> TileGrid:
    """Tiles covering the slide at ``spec.target_mpp`` that hold at least ``spec.min_tissue`` tissue.

    Parameters
    ----------
    dimensions : (width, height) of level 0, px.
    mpp : level-0 µm/px.
    level_downsamples : the slide's pyramid downsamples (level 0 first).
    mask : tissue mask of the slide.
    spec : tile size, overlap, target resolution, tissue threshold.

    Returns
    -------
    TileGrid, possibly empty (len 0) when no tile holds enough tissue.

    Notes
    -----
    Level-0 tile size and stride are rounded to whole pixels, so the tiles' real resolution
    ``tile_mpp`` differs from ``target_mpp`` by at most half a level-0 pixel per tile edge.
    """
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"mpp must be a positive number of µm/px, got {mpp}")
    scale = spec.target_mpp / mpp                      # level-0 px per tile px
    size_l0 = max(1, int(round(spec.tile_px * scale)))
    stride_l0 = max(1, int(round((spec.tile_px - spec.overlap_px) * scale)))
    width, height = dimensions
    overlap_l0 = size_l0 - stride_l0
    n_cols = max(1, math.ceil((width - overlap_l0) / stride_l0))
    n_rows = max(1, math.ceil((height - overlap_l0) / stride_l0))
    row, col = np.meshgrid(np.arange(n_rows, dtype=np.int32), np.arange(n_cols, dtype=np.int32), indexing="ij")
    row, col = row.ravel(), col.ravel()
    x = col.astype(np.int64) * stride_l0
    y = row.astype(np.int64) * stride_l0
    frac = _tissue_fractions(mask, x, y, size_l0)
    keep = frac >= max(spec.min_tissue, 1e-9)
    level, read_px = tile_level(level_downsamples, size_l0, spec.tile_px)
    return TileGrid(
        x=x[keep], y=y[keep], tissue_fraction=frac[keep], col=col[keep], row=row[keep],
        n_cols=n_cols, n_rows=n_rows, size_l0_px=size_l0, stride_l0_px=stride_l0,
        tile_px=spec.tile_px, tile_mpp=size_l0 * mpp / spec.tile_px, level=level, read_px=read_px,
    )
