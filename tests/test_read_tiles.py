"""Batched tile reads: TileBatch shape, origins, edge padding, cuCIM batched path vs single reads."""

from __future__ import annotations

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
