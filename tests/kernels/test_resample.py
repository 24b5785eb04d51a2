"""The compiled CPU resampler (gpupath_kernels.resample.resize_cpu) against its twin (two dense
matrix products with the same triangle weights), on real scan tiles: within 1 grey level."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import data_file
from gpupath.slide import open_slide
from gpupath_kernels.resample import filter_taps, resize_cpu, resize_ref, triangle_weights

# 1 grey level (float32 sums in another order), on at most 1 % of the pixels (measured <= 1e-3)
MAX_LEVELS, MAX_FRACTION = 1, 0.01


@pytest.fixture(scope="module")
def scan_tiles() -> np.ndarray:
    """(4, 512, 512, 3) uint8 tiles of the real CMU-1 crop (tissue, glass and their edges)."""
    with open_slide(data_file("cmu-1-small-region.svs")) as slide:
        return slide.read_tiles([(0, 0), (600, 400), (1200, 900), (1700, 1500)], 0, 512).pixels


@pytest.mark.parametrize("out_hw", [(256, 256), (384, 384), (200, 200), (171, 333), (512, 512), (640, 640)],
                         ids=["2x", "4/3x", "2.56x", "non-square", "same", "upsample"])
def test_kernel_matches_twin_on_real_tiles(scan_tiles: np.ndarray, out_hw: tuple[int, int]) -> None:
    got, want = resize_cpu(scan_tiles, *out_hw), resize_ref(scan_tiles, *out_hw)
    assert got.shape == want.shape == (len(scan_tiles), *out_hw, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_FRACTION, (diff.max(), (diff > 0).mean())


def test_taps_hold_every_non_zero_weight() -> None:
    """The kernel reads only the taps: scattered back, they are the dense weight matrix exactly."""
    for in_px, out_px in ((512, 256), (512, 200), (256, 512), (7, 3), (3, 7), (1, 4)):
        index, weight = filter_taps(in_px, out_px)
        dense = np.zeros((out_px, in_px), np.float32)
        np.add.at(dense, (np.repeat(np.arange(out_px), index.shape[1]), index.ravel()), weight.ravel())
        np.testing.assert_array_equal(dense, triangle_weights(in_px, out_px))
        assert index.min() >= 0 and index.max() < in_px


def test_two_x_reads_four_taps_of_one_three_three_one() -> None:
    index, weight = filter_taps(512, 256)
    assert index.shape == (256, 4)
    np.testing.assert_allclose(weight[1:-1], np.tile([1, 3, 3, 1], (254, 1)) / 8, rtol=1e-6)
    np.testing.assert_array_equal(index[10], [19, 20, 21, 22])  # output 10 centres on input 20.5


def test_non_contiguous_input(scan_tiles: np.ndarray) -> None:
    view = scan_tiles[:, ::2, ::2]  # strided (N, 256, 256, 3)
    np.testing.assert_array_equal(resize_cpu(view, 128, 128), resize_cpu(np.ascontiguousarray(view), 128, 128))


@pytest.mark.parametrize("batch, out_hw, match", [
    pytest.param(np.zeros((2, 8, 8, 3), np.float32), (4, 4), "expected \\(N, H, W, C\\) uint8", id="float"),
    pytest.param(np.zeros((8, 8, 3), np.uint8), (4, 4), "expected \\(N, H, W, C\\) uint8", id="no-batch-axis"),
    pytest.param(np.zeros((1, 8, 8, 3), np.uint8), (0, 4), "output size must be positive", id="zero-height"),
])
def test_bad_input(batch: np.ndarray, out_hw: tuple[int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resize_cpu(batch, *out_hw)


@pytest.mark.parametrize("shape", [(4, 512, 512, 3), (3, 6, 6, 3), (2, 8, 12, 3), (2, 64, 32, 1), (1, 10, 10, 4)],
                         ids=["512", "6", "non-square", "1-channel", "4-channel"])
def test_two_x_inner_pixels_equal_the_twin_exactly(scan_tiles: np.ndarray, shape: tuple[int, ...]) -> None:
    """The 2x kernel sums inner pixels as integers: weights 1/8 and 3/8 make the twin's float32 sums exact
    multiples of 1/64 in any order, so inside the tile both give the same bits (ties rounded to even); the
    renormalised edge rows and columns are float32 as the general kernel, within 1 grey level of the twin."""
    rng = np.random.default_rng(sum(shape))
    # random pixels: about 1 inner sum in 64 is a tie (x.5), half of them with x even, where round-half-up
    # and the twin's np.rint (half to even) part
    batch = scan_tiles if shape[1] == 512 else rng.integers(0, 256, shape, dtype=np.uint8)
    n, h, w, c = batch.shape
    got, want = resize_cpu(batch, h // 2, w // 2), resize_ref(batch, h // 2, w // 2)
    np.testing.assert_array_equal(got[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1])
    assert np.abs(got.astype(np.int16) - want).max() <= MAX_LEVELS
