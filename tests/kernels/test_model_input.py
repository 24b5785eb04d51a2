"""The compiled model-input conversion (gpupath_kernels.model_input) against its NumPy definition:
bit-identical, for every layout and channel order, on real tiles."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import data_file
from gpupath.slide import open_slide
from gpupath_kernels.model_input import model_input_cpu, model_input_ref

MEAN, STD = (0.75, 0.6, 0.75), (0.2, 0.2, 0.15)   # the shipped model's


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    with open_slide(data_file("cmu-1-small-region.svs")) as slide:
        return slide.read_tiles([(0, 0), (900, 700), (1500, 1300)], 0, 128).pixels


@pytest.mark.parametrize("nchw", [True, False], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("bgr", [False, True], ids=["RGB", "BGR"])
def test_kernel_is_the_definition_bit_for_bit(tiles: np.ndarray, nchw: bool, bgr: bool) -> None:
    got = model_input_cpu(tiles, scale=255.0, mean=MEAN, std=STD, nchw=nchw, bgr=bgr)
    want = model_input_ref(tiles, scale=255.0, mean=MEAN, std=STD, nchw=nchw, bgr=bgr)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_definition_on_known_values() -> None:
    """One pixel by hand: (v / 255 - mean) / std, channel order as asked."""
    px = np.array([[[[255, 0, 51]]]], np.uint8)
    rgb = model_input_ref(px, scale=255.0, mean=MEAN, std=STD, nchw=True, bgr=False)[0, :, 0, 0]
    np.testing.assert_allclose(rgb, [(1 - 0.75) / 0.2, (0 - 0.6) / 0.2, (0.2 - 0.75) / 0.15], rtol=1e-6)
    bgr = model_input_ref(px, scale=255.0, mean=MEAN, std=STD, nchw=True, bgr=True)[0, :, 0, 0]
    np.testing.assert_allclose(bgr, [(0.2 - 0.75) / 0.2, (0 - 0.6) / 0.2, (1 - 0.75) / 0.15], rtol=1e-6)


def test_non_contiguous_tiles(tiles: np.ndarray) -> None:
    view = tiles[:, ::2, 1::2]
    np.testing.assert_array_equal(model_input_cpu(view, scale=255.0, mean=MEAN, std=STD, nchw=True, bgr=False),
                                  model_input_ref(view, scale=255.0, mean=MEAN, std=STD, nchw=True, bgr=False))


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"tiles": np.zeros((1, 4, 4, 3), np.float32)}, "expected \\(N, H, W, 3\\) uint8", id="float-tiles"),
    pytest.param({"std": (0.2, 0.0, 0.1)}, "std > 0", id="zero-std"),
    pytest.param({"mean": (0.5, 0.5)}, "3 values each", id="two-means"),
])
def test_bad_input(kwargs: dict, match: str) -> None:
    args = {"tiles": np.zeros((1, 4, 4, 3), np.uint8), "scale": 255.0, "mean": MEAN, "std": STD, "nchw": True,
            "bgr": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        model_input_cpu(**args)
