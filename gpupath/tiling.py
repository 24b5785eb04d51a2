"""Tile grid at a target resolution, filtered by the tissue mask.

Takes slide geometry (level sizes and downsamples, mpp) and a :class:`TissueMask`; returns a
:class:`TileGrid` of square tiles of ``tile_px`` pixels at ``target_mpp`` with ``overlap_px``
pixels shared between neighbours. The grid is laid out in whole pixels of the level it is read
from; stored origins are level-0 px. It covers the whole slide; tiles at the right and bottom
edges may reach past it (read as white glass).

Host only: the grid is small (one row per tile) and is computed once per slide.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gpupath._coords import level0_origin
from gpupath.errors import ConfigError
from gpupath.tissue import TissueMask

__all__ = ["TileSpec", "TileGrid", "tile_grid", "tile_level", "DEFAULT_TARGET_MPP"]

DEFAULT_TARGET_MPP = 0.5  # µm/px of the tiles when a run asks for no other (20x)


MIN_TILE_PX, MAX_TILE_PX = 16, 4096  # 4096: a batch of 32 such tiles is 1.6 GB of RGB before any stage


@dataclass(frozen=True, slots=True)
class TileSpec:
    """What tiles to make: size and overlap in px at ``target_mpp``, and the tissue needed to keep one."""

    tile_px: int = 256
    overlap_px: int = 0
    target_mpp: float = DEFAULT_TARGET_MPP  # µm/px of the tiles handed to stages
    min_tissue: float = 0.05     # fraction of a tile's area that must be tissue

    def __post_init__(self) -> None:
        if not MIN_TILE_PX <= self.tile_px <= MAX_TILE_PX:
            raise ConfigError(f"tile_px must be in [{MIN_TILE_PX}, {MAX_TILE_PX}], got {self.tile_px} "
                              "(a tile batch is tiles x tile_px² x 3 bytes, several times over)")
        if not 0 <= self.overlap_px < self.tile_px // 2:
            raise ConfigError(f"overlap_px must be in [0, tile_px/2), got {self.overlap_px} for tile_px {self.tile_px}")
        if not (self.target_mpp > 0 and math.isfinite(self.target_mpp)):
            raise ConfigError(f"target_mpp must be a positive number of µm/px, got {self.target_mpp}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Tiles to process, and how to read them.

    The grid is laid out in pixels of the level it is read from, so every tile starts on a whole
    level pixel: tile ``i`` starts at level pixel ``(x_lvl[i], y_lvl[i])``, i.e. exactly at level-0
    ``(x_lvl[i] * downsample, y_lvl[i] * downsample)``. ``x, y`` are the integer level-0 origins that
    identify the tile (the smallest level-0 px that maps onto that level pixel).
    """

    x: np.ndarray                  # (N,) int64 level-0 px, left (inclusive), tile identity
    y: np.ndarray                  # (N,) int64 level-0 px, top (inclusive)
    x_lvl: np.ndarray              # (N,) int64 px at ``level``
    y_lvl: np.ndarray              # (N,) int64 px at ``level``
    tissue_fraction: np.ndarray    # (N,) float32 in [0, 1]
    col: np.ndarray                # (N,) int32 grid column
    row: np.ndarray                # (N,) int32 grid row
    n_cols: int
    n_rows: int
    level: int                     # pyramid level read
    downsample: float              # level-0 px per level px
    read_px: int                   # tile edge read at ``level``, px (resized to tile_px)
    stride_lvl_px: int             # distance between neighbouring tile origins, px at ``level``
    tile_px: int                   # tile edge handed to stages, px
    tile_mpp: float                # µm per tile px (read_px * downsample * mpp / tile_px)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def size_l0_px(self) -> int:
        """Level-0 extent of a tile edge, rounded to whole px (exact value: read_px * downsample)."""
        return int(round(self.read_px * self.downsample))

    @property
    def stride_l0(self) -> float:
        """Level-0 distance between neighbouring tile origins (exact, may be fractional)."""
        return self.stride_lvl_px * self.downsample

    @property
    def overlap_l0(self) -> float:
        """Level-0 width shared by neighbouring tiles (exact)."""
        return (self.read_px - self.stride_lvl_px) * self.downsample

    @property
    def l0_per_tile_px(self) -> float:
        """Level-0 px per tile px."""
        return self.read_px * self.downsample / self.tile_px

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Index arrays of consecutive tiles, ``batch_size`` at most each."""
        for start in range(0, len(self), batch_size):
            yield np.arange(start, min(start + batch_size, len(self)))


def tile_level(level_downsamples: tuple[float, ...], needed_downsample: float) -> int:
    """Coarsest level at least as fine as ``needed_downsample`` (0.5 % slack for rounded downsamples)."""
    level = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= needed_downsample * 1.005:
            level = i
    return level


def _tissue_fractions(mask: TissueMask, x0: np.ndarray, y0: np.ndarray, size_l0: float) -> np.ndarray:
    """Mean of the mask over each tile's level-0 footprint, from a summed-area table (exact per mask px)."""
    m = mask.mask.astype(np.int64)
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    ds = mask.downsample
    c0 = np.clip(np.floor(x0 / ds).astype(np.int64), 0, m.shape[1])
    c1 = np.clip(np.ceil((x0 + size_l0) / ds).astype(np.int64), 0, m.shape[1])
    r0 = np.clip(np.floor(y0 / ds).astype(np.int64), 0, m.shape[0])
    r1 = np.clip(np.ceil((y0 + size_l0) / ds).astype(np.int64), 0, m.shape[0])
    total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    return (total / area).astype(np.float32)


def tile_grid(*, level_dimensions: tuple[tuple[int, int], ...], level_downsamples: tuple[float, ...], mpp: float,
              mask: TissueMask, spec: TileSpec) -> TileGrid:
    """Tiles covering the slide at ``spec.target_mpp`` that hold at least ``spec.min_tissue`` tissue.

    Parameters
    ----------
    level_dimensions : (width, height) px of each pyramid level, level 0 first.
    level_downsamples : level-0 px per level px, level 0 first.
    mpp : level-0 µm/px.
    mask : tissue mask of the slide.
    spec : tile size, overlap, target resolution, tissue threshold.

    Returns
    -------
    TileGrid, possibly empty (len 0) when no tile holds enough tissue.

    Notes
    -----
    Tiles are read from the coarsest level at least as fine as the target, as ``read_px``-pixel
    squares resized to ``tile_px``. ``read_px`` and the stride are whole level pixels, so the
    tiles' real resolution ``tile_mpp`` differs from ``target_mpp`` by at most half a level pixel
    per tile edge.
    """
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive finite number of µm/px, got {mpp}")
    level = tile_level(level_downsamples, spec.target_mpp / mpp)
    ds = float(level_downsamples[level])
    scale = spec.target_mpp / (mpp * ds)                   # level px per tile px
    read_px = max(1, int(round(spec.tile_px * scale)))
    stride_lvl = max(1, int(round((spec.tile_px - spec.overlap_px) * scale)))
    width, height = level_dimensions[level]
    overlap_lvl = read_px - stride_lvl
    n_cols = max(1, math.ceil((width - overlap_lvl) / stride_lvl))
    n_rows = max(1, math.ceil((height - overlap_lvl) / stride_lvl))
    row, col = np.meshgrid(np.arange(n_rows, dtype=np.int32), np.arange(n_cols, dtype=np.int32), indexing="ij")
    row, col = row.ravel(), col.ravel()
    x_lvl = col.astype(np.int64) * stride_lvl
    y_lvl = row.astype(np.int64) * stride_lvl
    frac = _tissue_fractions(mask, x_lvl * ds, y_lvl * ds, read_px * ds)
    keep = frac >= max(spec.min_tissue, 1e-9)
    return TileGrid(
        x=level0_origin(x_lvl[keep], ds), y=level0_origin(y_lvl[keep], ds), x_lvl=x_lvl[keep], y_lvl=y_lvl[keep],
        tissue_fraction=frac[keep], col=col[keep], row=row[keep], n_cols=n_cols, n_rows=n_rows,
        level=level, downsample=ds, read_px=read_px, stride_lvl_px=stride_lvl, tile_px=spec.tile_px,
        tile_mpp=read_px * ds * mpp / spec.tile_px,
    )
