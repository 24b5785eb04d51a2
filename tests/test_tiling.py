"""TileGrid geometry: level-0 sizes at a target mpp, overlap, coverage, tissue filter, level choice."""

from __future__ import annotations

import numpy as np
import pytest

from gpupath.errors import ConfigError
from gpupath.tiling import TileSpec, tile_grid, tile_level
from gpupath.tissue import TissueMask


def full_mask(width: int, height: int, ds: float = 16.0) -> TissueMask:
    return TissueMask(np.ones((int(np.ceil(height / ds)), int(np.ceil(width / ds))), bool), ds, 0.25)


@pytest.mark.parametrize("target_mpp, size_l0", [(0.25, 256), (0.5, 512), (1.0, 1024)])
def test_level0_tile_size_follows_target_mpp(target_mpp: float, size_l0: int) -> None:
    grid = tile_grid((4000, 3000), 0.25, (1.0, 4.0, 16.0), full_mask(4000, 3000), TileSpec(target_mpp=target_mpp))
    assert grid.size_l0_px == size_l0
    assert grid.tile_mpp == pytest.approx(target_mpp)


def test_grid_covers_slide_with_overlap() -> None:
    spec = TileSpec(tile_px=256, overlap_px=32, target_mpp=0.5)
    grid = tile_grid((5000, 3001), 0.25, (1.0,), full_mask(5000, 3001), spec)
    assert grid.size_l0_px == 512 and grid.stride_l0_px == 448 and grid.overlap_l0_px == 64
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
    grid = tile_grid((1024, 1024), 0.25, (1.0,), mask, TileSpec(tile_px=256, target_mpp=0.25, min_tissue=0.01))
    for x, y in zip(grid.x, grid.y):
        assert x < 640 and x + 256 > 480 and y < 320 and y + 256 > 160
    assert len(grid) == 4  # the tissue square straddles 2 x 2 tiles
    assert np.all(grid.tissue_fraction > 0)


def test_empty_mask_gives_empty_grid() -> None:
    mask = TissueMask(np.zeros((8, 8), bool), 16.0, 0.25)
    grid = tile_grid((128, 128), 0.25, (1.0,), mask, TileSpec())
    assert len(grid) == 0 and grid.x.dtype == np.int64


def test_tile_level_never_upsamples() -> None:
    # tiles at 1.0 µm/px on a 0.25 µm/px slide (4x): level with downsample 4 is read as is
    assert tile_level((1.0, 4.0, 16.0), 1024, 256) == (1, 256)
    # 2x: level 0 read at 512 px, then downsampled
    assert tile_level((1.0, 4.0, 16.0), 512, 256) == (0, 512)
    # OpenSlide-style non-integer downsample just under the need is accepted
    assert tile_level((1.0, 4.016), 1028, 256)[0] == 1


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
