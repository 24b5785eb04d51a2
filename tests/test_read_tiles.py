"""Batched tile reads: TileBatch shape, origins, edge padding, the host file-tile cache and cuCIM's batched
device path against single reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import data_file
from gpupath._resize import resample_weights, resize_batch
from gpupath.slide import open_slide
from gpupath_kernels.resample import resize_ref

# inside, straddling the right edge, beyond the bottom, negative origin
LOCATIONS = [(0, 0), (300, 900), (2100, 100), (500, 2900), (-40, -10), (1000, 1000)]


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_read_tiles_matches_single_reads(backend: str) -> None:
    with open_slide(data_file("cmu-1-small-region.svs"), backend=backend) as slide:
        batch = slide.read_tiles(LOCATIONS, 0, 256)
        assert batch.pixels.shape == (len(LOCATIONS), 256, 256, 3) and batch.pixels.dtype == np.uint8
        assert batch.x.tolist() == [x for x, _ in LOCATIONS] and batch.y.tolist() == [y for _, y in LOCATIONS]
        assert batch.size_l0_px == 256 and len(batch) == len(LOCATIONS)
        for tile, loc in zip(batch.pixels, LOCATIONS):
            np.testing.assert_array_equal(tile, slide.read_rgb(loc, 0, (256, 256)))
        # (2100, 100) reaches past x = 2220: those columns are white glass
        assert (batch.pixels[2][:, 120:] == 255).all()
        assert (batch.pixels[4][:10] == 255).all() and (batch.pixels[4][:, :40] == 255).all()


def test_empty_request_has_defined_shape() -> None:
    with open_slide(data_file("cmu-1-small-region.svs")) as slide:
        batch = slide.read_tiles([], 0, 128)
        assert batch.pixels.shape == (0, 128, 128, 3) and batch.x.shape == (0,)


def test_resample_weights_rows_sum_to_one_and_average_when_downscaling() -> None:
    w = resample_weights(512, 256)
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-6)
    # a 2x downscale of a constant image is that constant; of a ramp, the ramp at pixel centres
    ramp = np.tile(np.arange(512, dtype=np.float32), (512, 1))
    down = w @ ramp @ w.T
    np.testing.assert_allclose(down[100, 1:-1], np.arange(256)[1:-1] * 2 + 0.5, atol=1e-3)


def test_resize_batch_identity_and_dtype() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert resize_batch(tiles, 64) is tiles
    small = resize_batch(tiles, 32)
    assert small.shape == (3, 32, 32, 3) and small.dtype == np.uint8
    flat = np.full((2, 64, 64, 3), 187, np.uint8)
    assert (resize_batch(flat, 48) == 187).all() and (resize_batch(flat, 100) == 187).all()


@pytest.mark.gpu
def test_device_resize_matches_host() -> None:
    import cupy

    tiles = np.random.default_rng(5).integers(0, 256, (4, 257, 257, 3), dtype=np.uint8)
    host = resize_ref(tiles, 256, 256)  # the twin: the same GEMMs on the host
    dev = resize_batch(cupy.asarray(tiles), 256)
    assert np.abs(cupy.asnumpy(dev).astype(int) - host).max() <= 1  # float32 GEMMs, rounding at .5


# --------------------------------------------------------------------------- the host file-tile cache

def _windows(slide: object, level: int, size: int, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` level-0 origins of ``size``-px squares at ``level``: inside, across the edges, partly outside."""
    rng = np.random.default_rng(seed)
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    return [(int(np.ceil(int(rng.integers(-size // 2, lw)) * ds)), int(np.ceil(int(rng.integers(-size // 2, lh)) * ds)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 4-level SVS (downsamples 1, 4, 16, 64.x) for the levels the real crops lack."""
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    path = tmp_path_factory.mktemp("pyr") / "pyr.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=5000, height_px=4000, mpp=0.25, seed=11))
    return path


@pytest.mark.parametrize("name, backend", [("cmu-1-small-region.svs", "cucim"), ("cmu-1-small-region.svs", "tifffile"),
                                           ("OS-2-ndpi.ome.tif", "auto"), ("pyramid", "cucim"), ("pyramid", "tifffile")])
def test_cached_reads_are_the_readers_own_pixels(name: str, backend: str, pyramid: Path) -> None:
    """read_tiles on the host assembles tiles from the file-tile cache: bit for bit what the reader gives
    for the same square read directly (read_rgb), at every level, inside, across and beyond the edges."""
    path = pyramid if name == "pyramid" else data_file(name)
    with open_slide(path, backend=backend) as slide:
        assert slide.backend in ("cucim", "tifffile")
        for level in range(slide.level_count):
            size = max(1, min(300, *slide.level_dimensions[level]))
            locations = _windows(slide, level, size, 12, seed=level)
            got = slide.read_tiles(locations, level, size).pixels
            for tile, loc in zip(got, locations):
                np.testing.assert_array_equal(tile, slide.read_rgb(loc, level, (size, size)), err_msg=f"{level} {loc}")
        assert slide.tile_cache_stats()["decoded"] > 0


def test_each_file_tile_decoded_once_for_overlapping_tiles() -> None:
    """Overlapping 512-px squares at a 448-px stride over 240-px file tiles: every file tile under them is
    decoded once (the direct reads would decode the shared ones again for each square)."""
    with open_slide(data_file("cmu-1-small-region.svs"), backend="cucim") as slide:
        tw, th = 240, 240
        assert (slide.properties["openslide.level[0].tile-width"], slide.properties["openslide.level[0].tile-height"]) \
            == (str(tw), str(th))
        locations = [(x, y) for y in range(0, 1400, 448) for x in range(0, 1700, 448)]
        slide.read_tiles(locations[:6], 0, 512)
        slide.read_tiles(locations[6:], 0, 512)
        stats = slide.tile_cache_stats()
    distinct = {(tx, ty) for x, y in locations for ty in range(y // th, (y + 511) // th + 1)
                for tx in range(x // tw, (x + 511) // tw + 1)}
    touched = sum(((x + 511) // tw - x // tw + 1) * ((y + 511) // th - y // th + 1) for x, y in locations)
    assert stats["decoded"] == len(distinct) < touched, (stats, len(distinct), touched)
    assert stats["decoded_px"] == stats["decoded"] * tw * th and stats["decode_cpu_s"] > 0


def test_a_cache_smaller_than_a_tile_still_gives_the_same_pixels() -> None:
    """A budget below one file tile evicts everything after each request: more decodes, same pixels."""
    locations = [(x, y) for y in (0, 300, 600) for x in (0, 300, 600, 900)]
    with open_slide(data_file("cmu-1-small-region.svs"), backend="cucim", tile_cache_mib=0.01) as tiny, \
         open_slide(data_file("cmu-1-small-region.svs"), backend="cucim", tile_cache_mib=0) as none:
        got = np.concatenate([tiny.read_tiles([loc], 0, 400).pixels for loc in locations])
        want = none.read_tiles(locations, 0, 400).pixels
        np.testing.assert_array_equal(got, want)
        assert none.tile_cache_stats() is None
        stats = tiny.tile_cache_stats()
        distinct = {(x // 240 + i, y // 240 + j) for x, y in locations for i in range(3) for j in range(3)
                    if (x + 399) // 240 >= x // 240 + i and (y + 399) // 240 >= y // 240 + j}
        assert stats["held_bytes"] <= 240 * 240 * 3  # the last tile only: the budget holds less than one
        assert stats["decoded"] > len(distinct) and stats["hits"] <= len(locations)  # each request decodes again


def test_fractional_cucim_levels_are_read_window_by_window(tmp_path: Path) -> None:
    """cuCIM maps level-0 origins to level px in float32: at a downsample of 2.9955 a run read at a file-tile
    boundary can start one px left, so such levels bypass the cache (and still give the direct pixels)."""
    import tifffile

    rng = np.random.default_rng(0)
    path = tmp_path / "frac.tif"
    level1 = np.full((336, 336, 3), 128, np.uint8)
    level1[..., 0], level1[..., 1] = np.arange(336)[None, :] % 256, np.arange(336)[:, None] % 256
    with tifffile.TiffWriter(path) as tw:
        tw.write(rng.integers(0, 255, (1006, 1007, 3), dtype=np.uint8), tile=(16, 16), compression="jpeg",
                 photometric="rgb")
        tw.write(level1, tile=(16, 16), compression="jpeg", photometric="rgb", subfiletype=1)
    with open_slide(path, backend="cucim") as slide:
        assert slide.backend == "cucim" and not float(slide.level_downsamples[1]).is_integer()
        locations = _windows(slide, 1, 24, 200, seed=1)
        got = slide.read_tiles(locations, 1, 24).pixels
        assert slide.tile_cache_stats()["decoded"] == 0  # level 1 bypassed the cache
        for tile, loc in zip(got, locations):
            np.testing.assert_array_equal(tile, slide.read_rgb(loc, 1, (24, 24)))
        slide.read_tiles(_windows(slide, 0, 40, 20, seed=2), 0, 40)
        assert slide.tile_cache_stats()["decoded"] > 0  # level 0 (downsample 1) through it


def test_openslide_keeps_its_own_cache() -> None:
    with open_slide(data_file("cmu-1-small-region.svs"), backend="openslide") as slide:
        assert slide.tile_cache_stats() is None


@pytest.mark.parametrize("mib", [-1, float("nan")])
def test_bad_cache_size(mib: float) -> None:
    with pytest.raises(ValueError, match="tile_cache_mib must be >= 0"):
        open_slide(data_file("cmu-1-small-region.svs"), tile_cache_mib=mib)
