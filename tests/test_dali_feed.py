"""DALI model-input pipeline: DaliPreprocessor equals preprocess() (real DALI, CPU backend; CUDA where a GPU is)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import data_file

from gpupath._xp import gpu_available
from gpupath.detect.card import InputSpec
from gpupath.detect.dali_feed import DaliPreprocessor, dali_available
from gpupath.detect.preprocess import preprocess
from gpupath.errors import ConfigError
from gpupath.slide import open_slide

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # three different channels: order errors show
# float32, no resize: DALI computes (p - mean*scale) * (1 / (std*scale)), the reference (p/scale - mean) / std;
# both round a few times in float32, measured max 2.4e-7 at |x| <= 2.7
ATOL_F32 = 1e-5
# With resize, in grey levels (the uint8 resize output; normalised units = levels / (scale * std)), measured on
# 256 px random-noise and CMU-1 tissue tiles, 256 -> 224, 320, 384, 224x320, 160, 128, 100:
#   - away from the tile edge (2 px) DALI's linear+antialias filter is the reference's triangle filter:
#     |diff| <= 1 level (uint8 rounding of nearly equal sums, DALI rounds halves up, the reference to even);
#   - edge rows/columns differ more: DALI clamps (repeats the edge pixel), the reference renormalises the
#     weights inside the tile. Up/mild downscale (>= 0.875): max 3 levels (noise), 2 (tissue); 2x or more
#     downscale: up to 14 levels (noise), 13 (tissue), in the outermost output row/column only;
#   - mean |diff| <= 0.032 levels for >= 0.875x, <= 0.121 levels for 2x-2.56x downscale (noise, the worst).
EDGE_PX = 2
INNER_MAX_LEVELS = 1.0
MILD = {"max_levels": 4.0, "mean_levels": 0.05}      # 256 -> 224, 320
STRONG = {"max_levels": 16.0, "mean_levels": 0.15}   # 256 -> 128


def levels(diff: np.ndarray, spec: InputSpec, layout: str) -> np.ndarray:
    """A normalised-unit difference in grey levels: times scale * std per channel."""
    unit = np.float32(spec.scale) * np.asarray(spec.std, np.float32)
    return diff * (unit[:, None, None] if layout == "NCHW" else unit)


def tiles_of(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def check_same(got: np.ndarray, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == want.dtype
    assert got.flags.c_contiguous


def test_dali_available() -> None:
    assert dali_available() == (True, "")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("channels", ["RGB", "BGR"])
def test_no_resize_float32(layout: str, channels: str) -> None:
    spec = InputSpec(name="x", layout=layout, channels=channels, mean=MEAN, std=STD)
    tiles = tiles_of((4, 40, 56, 3), 0)
    got, want = DaliPreprocessor(spec, batch_size=4)(tiles), preprocess(tiles, spec)
    check_same(got, want)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL_F32)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_float16_within_one_rounding(layout: str) -> None:
    spec = InputSpec(name="x", layout=layout, channels="BGR", dtype="float16", mean=MEAN, std=STD)
    tiles = tiles_of((3, 32, 32, 3), 1)
    got, want = DaliPreprocessor(spec, batch_size=4)(tiles), preprocess(tiles, spec)
    check_same(got, want)
    # float32 values 1e-7 apart may round to neighbouring float16s: one float16 step (2**-10 relative)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2**-10, atol=2**-24)


def test_smaller_batches_and_successive_calls() -> None:
    spec = InputSpec(name="x", mean=MEAN, std=STD)
    pre = DaliPreprocessor(spec, batch_size=8)
    batches = [tiles_of((8, 24, 24, 3), 2), tiles_of((3, 24, 24, 3), 3), tiles_of((1, 24, 24, 3), 4),
               tiles_of((5, 16, 40, 3), 5)]        # last: another tile size through the same pipeline
    outs = [pre(b) for b in batches]
    assert [o.shape[0] for o in outs] == [8, 3, 1, 5]
    # every result is still its own batch after later calls (DALI does not reuse the returned buffers)
    for b, o in zip(batches, outs):
        np.testing.assert_allclose(o, preprocess(b, spec), atol=ATOL_F32)
    assert len(pre._pipes) == 1   # one pipeline for all calls


def test_odd_tiles_and_non_contiguous_input() -> None:
    spec = InputSpec(name="x", layout="NHWC", channels="BGR", mean=MEAN, std=STD)
    pre = DaliPreprocessor(spec, batch_size=2)
    one = tiles_of((1, 3, 5, 3), 6)
    np.testing.assert_allclose(pre(one), preprocess(one, spec), atol=ATOL_F32)
    strided = tiles_of((2, 20, 30, 3), 7)[:, ::2, 1::3]
    np.testing.assert_allclose(pre(strided), preprocess(strided, spec), atol=ATOL_F32)


def test_empty_batch_has_defined_shape() -> None:
    spec = InputSpec(name="x", size_px=(16, 24), dtype="float16")
    out = DaliPreprocessor(spec, batch_size=4)(np.zeros((0, 32, 32, 3), np.uint8))
    assert out.shape == (0, 3, 16, 24) and out.dtype == np.float16


@pytest.mark.parametrize(("size_px", "bounds"), [((224, 224), MILD), ((320, 320), MILD), ((224, 320), MILD),
                                                  ((128, 128), STRONG)])
def test_resize_within_measured_tolerance(size_px: tuple[int, int], bounds: dict[str, float]) -> None:
    spec = InputSpec(name="x", size_px=size_px, mean=MEAN, std=STD)
    tiles = tiles_of((4, 256, 256, 3), 8)   # pixel noise: the hardest case for the filters' edge handling
    got, want = DaliPreprocessor(spec, batch_size=4)(tiles), preprocess(tiles, spec)
    check_same(got, want)
    diff = levels(np.abs(got - want), spec, "NCHW")
    inner = diff[:, :, EDGE_PX:-EDGE_PX, EDGE_PX:-EDGE_PX]
    assert inner.max() <= INNER_MAX_LEVELS + 1e-3
    assert diff.max() <= bounds["max_levels"] + 1e-3 and diff.mean() <= bounds["mean_levels"]


def test_tiles_at_size_px_skip_the_resize() -> None:
    spec = InputSpec(name="x", size_px=(32, 32), mean=MEAN, std=STD)
    pre = DaliPreprocessor(spec, batch_size=2)
    tiles = tiles_of((2, 32, 32, 3), 9)
    np.testing.assert_allclose(pre(tiles), preprocess(tiles, spec), atol=ATOL_F32)
    assert list(pre._pipes) == [False]


def test_real_slide_tiles() -> None:
    with open_slide(data_file("cmu-1-small-region.svs")) as slide:
        tiles = slide.read_tiles([(600, 600), (1200, 900), (1800, 1200), (300, 1400)], 0, 256).pixels
    assert tiles.std() > 10   # tissue, not blank glass
    plain = InputSpec(name="x", channels="BGR", mean=MEAN, std=STD)
    np.testing.assert_allclose(DaliPreprocessor(plain, batch_size=4)(tiles), preprocess(tiles, plain), atol=ATOL_F32)
    for size_px, bounds in (((224, 224), MILD), ((128, 128), STRONG)):
        spec = InputSpec(name="x", size_px=size_px, layout="NHWC", mean=MEAN, std=STD)
        diff = levels(np.abs(DaliPreprocessor(spec, batch_size=4)(tiles) - preprocess(tiles, spec)), spec, "NHWC")
        assert diff[:, EDGE_PX:-EDGE_PX, EDGE_PX:-EDGE_PX].max() <= INNER_MAX_LEVELS + 1e-3
        assert diff.max() <= bounds["max_levels"] + 1e-3 and diff.mean() <= bounds["mean_levels"]


def test_rejects_batch_over_batch_size() -> None:
    with pytest.raises(ValueError, match="batch of 5 tiles exceeds batch_size=4"):
        DaliPreprocessor(InputSpec(name="x"), batch_size=4)(np.zeros((5, 8, 8, 3), np.uint8))


def test_rejects_bad_tiles() -> None:
    pre = DaliPreprocessor(InputSpec(name="x"), batch_size=4)
    with pytest.raises(TypeError, match="must be uint8"):
        pre(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        pre(np.zeros((8, 8, 3), np.uint8))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="device must be cpu or cuda, got 'gpu'"):
        DaliPreprocessor(InputSpec(name="x"), batch_size=4, device="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        DaliPreprocessor(InputSpec(name="x"), batch_size=0)
    with pytest.raises(TypeError, match="spec must be an InputSpec"):
        DaliPreprocessor("x", batch_size=4)  # type: ignore[arg-type]


def test_missing_dali_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes `import nvidia.dali` raise ImportError, as on a machine without DALI
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    ok, reason = dali_available()
    assert not ok and "not installed" in reason
    with pytest.raises(ConfigError, match="DaliPreprocessor needs NVIDIA DALI: NVIDIA DALI is not installed"):
        DaliPreprocessor(InputSpec(name="x"), batch_size=4)


def test_cuda_without_gpu_is_a_config_error() -> None:
    if gpu_available():
        pytest.skip("a CUDA device is present: device='cuda' is valid here")
    with pytest.raises(ConfigError, match="device='cuda'.*needs CuPy and a CUDA device"):
        DaliPreprocessor(InputSpec(name="x"), batch_size=4, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [InputSpec(name="x", channels="BGR", mean=MEAN, std=STD),
                                  InputSpec(name="x", layout="NHWC", dtype="float16", mean=MEAN, std=STD),
                                  InputSpec(name="x", size_px=(224, 224), mean=MEAN, std=STD)],
                         ids=["bgr-nchw", "nhwc-f16", "resize224"])
def test_cuda_cupy_in_cupy_out(spec: InputSpec) -> None:
    import cupy

    pre = DaliPreprocessor(spec, batch_size=4, device="cuda")
    batches = [cupy.asarray(tiles_of((4, 256, 256, 3), 10)), cupy.asarray(tiles_of((2, 256, 256, 3), 11))]
    outs = [pre(b) for b in batches]
    for b, got in zip(batches, outs):   # the first result is intact after the second call
        want = preprocess(b, spec)
        assert isinstance(got, cupy.ndarray) and got.shape == want.shape and got.dtype == want.dtype
        assert got.flags.c_contiguous and got.device.id == 0
        diff = cupy.abs(got.astype(cupy.float32) - want.astype(cupy.float32))
        if spec.size_px is None and spec.dtype == "float32":
            assert float(diff.max()) <= ATOL_F32
        elif spec.size_px is None:
            assert bool(cupy.all(diff <= 2**-10 * cupy.abs(want.astype(cupy.float32)) + 2**-24))
        else:
            lv = levels(cupy.asnumpy(diff), spec, "NCHW")
            assert lv[:, :, EDGE_PX:-EDGE_PX, EDGE_PX:-EDGE_PX].max() <= INNER_MAX_LEVELS + 1e-3
            assert lv.max() <= MILD["max_levels"] + 1e-3 and lv.mean() <= MILD["mean_levels"]
    with pytest.raises(TypeError, match="takes CuPy"):
        pre(np.zeros((1, 256, 256, 3), np.uint8))
    with pytest.raises(TypeError, match="takes NumPy"):
        DaliPreprocessor(spec, batch_size=4)(batches[1])
