"""TileGrid geometry: level-0 sizes at a target mpp, overlap, coverage, tissue filter, level choice."""

from __future__ import annotations

import numpy as np
import pytest

from gpupath.errors import ConfigError
from gpupath.tiling import TileSpec, tile_grid, tile_level
from gpupath.tissue import TissueMask


def grid_of(dims: tuple[int, int], mpp: float, downsamples: tuple[float, ...], mask: TissueMask, spec: TileSpec):
    """A grid for a slide whose levels are exact divisions of ``dims``."""
    levels = tuple((int(dims[0] // d), int(dims[1] // d)) for d in downsamples)
    return tile_grid(level_dimensions=levels, level_downsamples=downsamples, mpp=mpp, mask=mask, spec=spec)


def full_mask(width: int, height: int, ds: float = 16.0) -> TissueMask:
    return TissueMask(np.ones((int(np.ceil(height / ds)), int(np.ceil(width / ds))), bool), ds, 0.25)


@pytest.mark.parametrize("target_mpp, size_l0", [(0.25, 256), (0.5, 512), (1.0, 1024)])
def test_level0_tile_size_follows_target_mpp(target_mpp: float, size_l0: int) -> None:
    grid = grid_of((4000, 3000), 0.25, (1.0, 4.0, 16.0), full_mask(4000, 3000), TileSpec(target_mpp=target_mpp))
    assert grid.size_l0_px == size_l0
    assert grid.tile_mpp == pytest.approx(target_mpp)


def test_grid_covers_slide_with_overlap() -> None:
    spec = TileSpec(tile_px=256, overlap_px=32, target_mpp=0.5)
    grid = grid_of((5000, 3001), 0.25, (1.0,), full_mask(5000, 3001), spec)
    assert grid.size_l0_px == 512 and grid.stride_l0 == 448 and grid.overlap_l0 == 64
    # every level-0 column and row of the slide lies in some tile
    assert grid.x.min() == 0 and grid.y.min() == 0
    assert grid.x.max() + grid.size_l0_px >= 5000 and grid.y.max() + grid.size_l0_px >= 3001
    assert np.all(np.diff(np.unique(grid.x)) == 448)
    assert len(grid) == grid.n_cols * grid.n_rows
    # no tile starts beyond the slide
    assert grid.x.max() < 5000 and grid.y.max() < 3001


def test_tissue_filter_keeps_only_tiles_over_tissue() -> None:
    mask = TissueMask(np.zeros((64, 64), bool), 16.0, 0.25)
    mask.mask[10:20, 30:40] = True       # level-0 x in [480, 640), y in [160, 320)
    grid = grid_of((1024, 1024), 0.25, (1.0,), mask, TileSpec(tile_px=256, target_mpp=0.25, min_tissue=0.01))
    for x, y in zip(grid.x, grid.y):
        assert x < 640 and x + 256 > 480 and y < 320 and y + 256 > 160
    assert len(grid) == 4  # the tissue square straddles 2 x 2 tiles
    assert np.all(grid.tissue_fraction > 0)


def test_empty_mask_gives_empty_grid() -> None:
    mask = TissueMask(np.zeros((8, 8), bool), 16.0, 0.25)
    grid = grid_of((128, 128), 0.25, (1.0,), mask, TileSpec())
    assert len(grid) == 0 and grid.x.dtype == np.int64


def test_tile_level_never_upsamples() -> None:
    # tiles at 1.0 µm/px on a 0.25 µm/px slide (4x): the level with downsample 4 is read as is
    assert tile_level((1.0, 4.0, 16.0), 4.0) == 1
    # 2x: level 0, then downsampled
    assert tile_level((1.0, 4.0, 16.0), 2.0) == 0
    # OpenSlide-style non-integer downsample just over the need is accepted
    assert tile_level((1.0, 4.016), 4.0) == 1


def test_grid_on_fractional_downsample_level_starts_on_whole_level_pixels() -> None:
    # a 4099 px slide: level 1 is 1024 px wide, downsample 4.0029...; tiles at 1 µm/px read from it
    downsamples = (1.0, (4099 / 1024 + 4099 / 1024) / 2)
    levels = ((4099, 4099), (1024, 1024))
    spec = TileSpec(tile_px=256, overlap_px=32, target_mpp=1.0)
    grid = tile_grid(level_dimensions=levels, level_downsamples=downsamples, mpp=0.25,
                     mask=full_mask(4099, 4099), spec=spec)
    assert grid.level == 1 and grid.read_px == 256 and grid.stride_lvl_px == 224
    ds = grid.downsample
    # every integer origin maps back onto the tile's first level pixel
    assert (np.floor(grid.x / ds) == grid.x_lvl).all() and (np.floor(grid.y / ds) == grid.y_lvl).all()
    assert grid.l0_per_tile_px == pytest.approx(ds) and grid.tile_mpp == pytest.approx(0.25 * ds)


@pytest.mark.parametrize("kwargs, match", [
    ({"tile_px": 8}, "tile_px"),
    ({"overlap_px": 128}, "overlap_px"),
    ({"overlap_px": -1}, "overlap_px"),
    ({"target_mpp": 0.0}, "target_mpp"),
    ({"min_tissue": 1.5}, "min_tissue"),
])
def test_bad_spec(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TileSpec(**kwargs)
