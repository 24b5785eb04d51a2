"""Model-input preprocessing: preprocess() against a plain NumPy formula, resize, input_scale, error paths."""

from __future__ import annotations

import types

import numpy as np
import pytest

from gpupath._resize import resize_batch
from gpupath._xp import to_host
from gpupath.detect.card import InputSpec
from gpupath.detect.preprocess import input_scale, preprocess

# ImageNet statistics: three different channels, so a wrong channel order shows
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# float32 (reference computed in float64): values reach |x| ~ 2.6, float32 keeps ~7 digits
ATOL_F32 = 1e-5


def formula(tiles: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The model input written out plainly in float64: order channels, normalise, lay out."""
    rgb = tiles.astype(np.float64)
    chans = [rgb[..., 2], rgb[..., 1], rgb[..., 0]] if spec.channels == "BGR" else [rgb[..., c] for c in range(3)]
    planes = [(p / spec.scale - m) / s for p, m, s in zip(chans, spec.mean, spec.std)]
    return np.stack(planes, axis=1 if spec.layout == "NCHW" else -1)


def triangle_resize(tile: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent loop version of the documented filter: triangle of half-width max(in/out, 1) input px,
    half-pixel centres, weights renormalised inside the tile; float64, before rounding to uint8."""
    def weights(in_px: int, out_px: int) -> np.ndarray:
        scale = in_px / out_px
        w = np.zeros((out_px, in_px))
        for o in range(out_px):
            centre = (o + 0.5) * scale - 0.5
            for i in range(in_px):
                w[o, i] = max(0.0, 1.0 - abs(i - centre) / max(scale, 1.0))
            w[o] /= w[o].sum()
        return w

    wy, wx = weights(tile.shape[0], out_h), weights(tile.shape[1], out_w)
    return np.einsum("yr,rcz,xc->yxz", wy, tile.astype(np.float64), wx)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("channels", ["RGB", "BGR"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_matches_formula(xp: types.ModuleType, layout: str, channels: str, dtype: str) -> None:
    spec = InputSpec(name="x", layout=layout, channels=channels, dtype=dtype, mean=MEAN, std=STD)
    tiles = np.random.default_rng(0).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    got = preprocess(xp.asarray(tiles), spec)
    assert isinstance(got, xp.ndarray) and got.dtype == np.dtype(dtype) and got.flags.c_contiguous
    want = formula(tiles, spec)
    assert got.shape == want.shape == ((3, 3, 16, 24) if layout == "NCHW" else (3, 16, 24, 3))
    if dtype == "float32":
        np.testing.assert_allclose(to_host(got), want, rtol=0, atol=ATOL_F32)
    else:  # the float32 result rounded once to float16: exactly the float16 of the float32 formula
        want32 = formula(tiles, spec).astype(np.float32)
        np.testing.assert_allclose(to_host(got).astype(np.float32), want32, rtol=2**-11, atol=2**-24)


def test_scale_and_white_black(xp: types.ModuleType) -> None:
    spec = InputSpec(name="x", scale=1.0, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    tiles = xp.asarray(np.stack([np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)]))
    got = to_host(preprocess(tiles, spec))
    np.testing.assert_allclose(got[0, :, 0, 0], [-5.0, -5.0, -6.0])
    np.testing.assert_allclose(got[1, :, 0, 0], [122.5, 58.75, 45.0])


def test_odd_shapes_and_non_contiguous_input(xp: types.ModuleType) -> None:
    spec = InputSpec(name="x", channels="BGR", mean=MEAN, std=STD)
    rng = np.random.default_rng(1)
    one = rng.integers(0, 256, (1, 3, 5, 3), dtype=np.uint8)       # 1 tile of 3x5 px
    np.testing.assert_allclose(to_host(preprocess(xp.asarray(one), spec)), formula(one, spec), atol=ATOL_F32)
    pixel = rng.integers(0, 256, (1, 1, 1, 3), dtype=np.uint8)     # 1 tile of 1x1 px
    np.testing.assert_allclose(to_host(preprocess(xp.asarray(pixel), spec)), formula(pixel, spec), atol=ATOL_F32)
    big = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    strided = xp.asarray(big)[:, ::2, 1::3]                           # (2, 10, 10, 3), not contiguous
    np.testing.assert_allclose(to_host(preprocess(strided, spec)), formula(big[:, ::2, 1::3], spec), atol=ATOL_F32)


def test_empty_batch_has_defined_shape(xp: types.ModuleType) -> None:
    out = preprocess(xp.zeros((0, 32, 32, 3), np.uint8), InputSpec(name="x", dtype="float16"))
    assert out.shape == (0, 3, 32, 32) and out.dtype == np.float16
    out = preprocess(xp.zeros((0, 32, 32, 3), np.uint8), InputSpec(name="x", size_px=(16, 24), layout="NHWC"))
    assert out.shape == (0, 16, 24, 3) and out.dtype == np.float32


def test_square_resize_is_resize_batch(xp: types.ModuleType) -> None:
    spec = InputSpec(name="x", size_px=(24, 24), mean=MEAN, std=STD)
    tiles = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = to_host(preprocess(xp.asarray(tiles), spec))
    assert got.shape == (2, 3, 24, 24)
    np.testing.assert_allclose(got, formula(resize_batch(tiles, 24), spec), atol=ATOL_F32)


@pytest.mark.parametrize("size_px", [(5, 7), (12, 4), (15, 9)])
def test_resize_matches_loop_triangle_filter(xp: types.ModuleType, size_px: tuple[int, int]) -> None:
    spec = InputSpec(name="x", size_px=size_px, layout="NHWC", scale=1.0)   # output = resized grey levels
    tiles = np.random.default_rng(3).integers(0, 256, (2, 12, 10, 3), dtype=np.uint8)
    got = to_host(preprocess(xp.asarray(tiles), spec))
    exact = np.stack([triangle_resize(t, *size_px) for t in tiles])
    assert got.shape == exact.shape == (2, *size_px, 3)
    # rounded to uint8 alike, except at .5 ties (common: the weights are simple fractions), where the
    # float32 matmul may land on either side
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
    np.testing.assert_array_equal(got[~tie], np.rint(exact[~tie]))
    assert np.abs(got - exact)[tie].max(initial=0) <= 0.5 + 1e-3


def test_no_resize_when_tiles_are_already_size_px(xp: types.ModuleType) -> None:
    spec = InputSpec(name="x", size_px=(8, 12), mean=MEAN, std=STD)
    tiles = np.random.default_rng(4).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    np.testing.assert_allclose(to_host(preprocess(xp.asarray(tiles), spec)), formula(tiles, spec), atol=ATOL_F32)


def test_input_scale() -> None:
    assert input_scale(InputSpec(name="x"), 256) == (1.0, 1.0)
    assert input_scale(InputSpec(name="x", size_px=(224, 320)), 256) == (0.875, 1.25)
    assert input_scale(InputSpec(name="x", size_px=(256, 256)), 256) == (1.0, 1.0)
    assert input_scale(InputSpec(name="x", size_px=(100, 100)), (200, 400)) == (0.5, 0.25)
    with pytest.raises(ValueError, match="tile size must be positive"):
        input_scale(InputSpec(name="x", size_px=(224, 224)), 0)


def test_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) RGB, got shape \(8, 8, 3\)"):
        preprocess(np.zeros((8, 8, 3), np.uint8), InputSpec(name="x"))


def test_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"got shape \(1, 8, 8, 4\)"):
        preprocess(np.zeros((1, 8, 8, 4), np.uint8), InputSpec(name="x"))


def test_rejects_non_uint8() -> None:
    with pytest.raises(TypeError, match="must be uint8 RGB, got dtype float32"):
        preprocess(np.zeros((1, 8, 8, 3), np.float32), InputSpec(name="x"))


def test_rejects_empty_tiles() -> None:
    with pytest.raises(ValueError, match="positive height and width"):
        preprocess(np.zeros((1, 0, 8, 3), np.uint8), InputSpec(name="x"))


def test_rejects_size_not_multiple_of() -> None:
    with pytest.raises(ValueError, match="multiples of 8 px, got tiles of 12x16 px"):
        preprocess(np.zeros((1, 12, 16, 3), np.uint8), InputSpec(name="m", multiple_of=8))
    # a fixed-size model resizes, so any tile size is fine
    assert preprocess(np.zeros((1, 12, 16, 3), np.uint8), InputSpec(name="m", multiple_of=8, size_px=(8, 8))).shape \
        == (1, 3, 8, 8)


def test_rejects_non_spec() -> None:
    with pytest.raises(TypeError, match="spec must be an InputSpec, got dict"):
        preprocess(np.zeros((1, 8, 8, 3), np.uint8), {"name": "x"})  # type: ignore[arg-type]
