"""Nuclei kernels (hematoxylin, multi-scale LoG, peak mask) vs their NumPy/SciPy twins.

Runs the Numba kernels under the CUDA simulator on NumPy arrays (no GPU), and on CuPy arrays when a
GPU is present (``gpu`` mark). Inputs are small (tiles of 16 x 20 px, sigmas of 1-2.5 px): the
simulator runs every CUDA thread as a Python thread. Tolerances are stated at each comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

import gpupath.detect.classic as classic
from conftest import data_file
from gpupath.slide import open_slide
from conftest import Backend
from helpers_classic import DISCS, MPP, he_tile  # the host detector's own known-answer tiles
from kernel_helpers import assert_compiles_for_gpu
from gpupath_kernels.nuclei import (
    best_log_response,
    best_log_response_ref,
    gaussian_taps,
    hematoxylin,
    hematoxylin_ref,
    log_response,
    log_response_ref,
    peak_mask,
    peak_mask_ref,
)

H_ROW = classic._deconvolution_matrix(classic.RUIFROK_HE_OD)[:, 0]
SIGMAS = (1.0, 1.6, 2.5)      # px; radii up to 10 px, so 16 x 20 tiles exercise both borders
HEMA_ATOL = 1e-5              # float32 OD of up to 5.5 times |h_row| <= 2: a few ulp (measured 2.4e-7 sim)
RESP_ATOL = 1e-5              # float32 taps and sums vs SciPy's float64 sums (measured 1.2e-7 sim)


def real_tiles() -> np.ndarray:
    """Two 16 x 20 px tiles of the CMU-1 crop at 0.5 µm/px: H&E tissue with a strip of glass (seen by eye)."""
    slide = open_slide(data_file("cmu-1-small-region.svs"))
    rgb = slide.read_rgb((1000, 1200), 0, (40, 32))  # (x, y), level 0, (w, h)
    return np.stack([rgb[:16, :20], rgb[16:, 20:]])


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Blobby float32 field, 0..~1.5 (hematoxylin-like), no exact ties."""
    field = ndimage.gaussian_filter(rng.random(shape), (0, 1.5, 1.5)) * 3 - 1
    return (field + 0.01 * rng.random(shape)).astype(np.float32)


# --------------------------------------------------------------------------- taps
@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.5, 3.54, 7.78])
@pytest.mark.parametrize("order", [0, 1, 2])
def test_taps_are_scipys(sigma: float, order: int) -> None:
    taps = gaussian_taps(sigma, order)
    radius = int(4.0 * sigma + 0.5)
    assert taps.shape == (2 * radius + 1,)
    # SciPy's weights, read back as the impulse response of its public filter: out[c - j] = w[R + j]
    impulse = np.zeros(4 * radius + 1)
    impulse[2 * radius] = 1.0
    response = ndimage.gaussian_filter1d(impulse, sigma, order=order, mode="constant")
    np.testing.assert_allclose(taps, response[radius:3 * radius + 1][::-1], rtol=1e-14, atol=1e-16)  # float64 rounding


# --------------------------------------------------------------------------- hematoxylin
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 3, 5, 3), (2, 16, 20, 3), (7, 9, 3)])
def test_hematoxylin_matches_twin(backend: Backend, shape: tuple[int, ...]) -> None:
    tiles = np.random.default_rng(len(shape) + shape[-2]).integers(0, 256, shape, dtype=np.uint8)
    got = backend.get(hematoxylin(backend.put(tiles), H_ROW))
    assert got.dtype == np.float32 and got.shape == shape[:-1]
    np.testing.assert_allclose(got, hematoxylin_ref(tiles, H_ROW), rtol=0, atol=HEMA_ATOL)


def test_hematoxylin_twin_is_the_detectors() -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(hematoxylin_ref(tiles, H_ROW), classic.hematoxylin_od(tiles))  # same ops: exact


def test_hematoxylin_non_contiguous_and_real(backend: Backend) -> None:
    tiles = real_tiles()
    strided = tiles[:, ::-1, 1::2]  # flipped rows, every other column
    assert not strided.flags.c_contiguous
    for x in (tiles, strided):
        got = backend.get(hematoxylin(backend.put(x), H_ROW))
        np.testing.assert_allclose(got, hematoxylin_ref(x, H_ROW), rtol=0, atol=HEMA_ATOL)


# --------------------------------------------------------------------------- LoG response
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 5), (2, 16, 20)])
def test_best_log_response_matches_twin(backend: Backend, shape: tuple[int, int, int]) -> None:
    h = smooth_field(np.random.default_rng(shape[-1]), shape)
    best, scale = (backend.get(a) for a in best_log_response(backend.put(h), SIGMAS))
    want, want_scale = best_log_response_ref(h, SIGMAS)
    assert best.dtype == np.float32 and scale.dtype == np.int8 and best.shape == shape
    np.testing.assert_allclose(best, want, rtol=0, atol=RESP_ATOL)
    # the winning scale agrees wherever the best two scales differ by more than the tolerance
    per_scale = np.sort(np.stack([log_response_ref(h, s) for s in SIGMAS]), axis=0)
    clear = per_scale[-1] - per_scale[-2] > 2 * RESP_ATOL
    np.testing.assert_array_equal(scale[clear], want_scale[clear])


def test_log_response_one_scale_non_contiguous(backend: Backend) -> None:
    big = smooth_field(np.random.default_rng(5), (3, 32, 21))
    h = big[::2, ::2, ::-1]  # (2, 16, 21), every stride odd
    got = backend.get(log_response(backend.put(h), 1.6))
    np.testing.assert_allclose(got, log_response_ref(np.ascontiguousarray(h), 1.6), rtol=0, atol=RESP_ATOL)


def test_log_response_tiles_are_independent(backend: Backend) -> None:
    h = smooth_field(np.random.default_rng(6), (2, 12, 14))
    pair = backend.get(log_response(backend.put(h), 2.5))
    alone = backend.get(log_response(backend.put(h[1:]), 2.5))
    np.testing.assert_array_equal(pair[1], alone[0])  # no smoothing across the batch axis: exact


# --------------------------------------------------------------------------- peaks
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 5), (2, 16, 20)])
@pytest.mark.parametrize("window", [3, 5, 11])
def test_peak_mask_matches_twin_with_ties(backend: Backend, shape: tuple[int, int, int], window: int) -> None:
    # quantised values: plateaus and ties everywhere, so "== window max" must mean the same thing
    best = (np.random.default_rng(window).integers(0, 5, shape) / 4.0).astype(np.float32)
    for x in (best, best.astype(np.float64)):
        got = backend.get(peak_mask(backend.put(x), window_px=window, threshold=0.25))
        np.testing.assert_array_equal(got, peak_mask_ref(x, window_px=window, threshold=0.25))  # exact


@pytest.mark.parametrize("threshold", [0.3, 0.1])
def test_peak_at_exactly_the_threshold_compares_in_the_array_precision(backend: Backend, threshold: float) -> None:
    # float32(0.3) > 0.3 is False in NumPy (the Python float is cast to float32) but True in
    # float64: the kernel must compare as the host does
    best = np.zeros((1, 5, 5), np.float32)
    best[0, 2, 2] = np.float32(threshold)
    got = backend.get(peak_mask(backend.put(best), window_px=3, threshold=threshold))
    np.testing.assert_array_equal(got, peak_mask_ref(best, window_px=3, threshold=threshold))
    assert not got.any()


def test_peak_mask_non_contiguous(backend: Backend) -> None:
    best = smooth_field(np.random.default_rng(8), (2, 40, 20))[:, ::2, :]
    got = backend.get(peak_mask(backend.put(best), window_px=3, threshold=0.1))
    want = peak_mask_ref(best, window_px=3, threshold=0.1)
    assert want.any()
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- the chain on real tiles
def ambiguous(best: np.ndarray, window: int, threshold: float, margin: float) -> np.ndarray:
    """Pixels whose peak decision could flip under an error of ``margin``: near the threshold, or
    within ``margin`` of another value in their window."""
    half = window // 2
    padded = np.pad(best, ((0, 0), (half, half), (half, half)), mode="edge")
    near_tie = np.zeros(best.shape, bool)
    for dr in range(-half, half + 1):
        for dc in range(-half, half + 1):
            if dr or dc:
                other = padded[:, half + dr:half + dr + best.shape[1], half + dc:half + dc + best.shape[2]]
                near_tie |= np.abs(other - best) <= margin
    return near_tie | (np.abs(best - threshold) <= margin)


def test_chain_on_real_tiles_gives_the_twins_peaks(backend: Backend) -> None:
    tiles = real_tiles()
    h = hematoxylin(backend.put(tiles), H_ROW)
    best, _ = best_log_response(h, SIGMAS)
    got = backend.get(peak_mask(best, window_px=3, threshold=0.05))
    want_best, _ = best_log_response_ref(hematoxylin_ref(tiles, H_ROW), SIGMAS)
    want = peak_mask_ref(want_best, window_px=3, threshold=0.05)
    assert want.sum() >= 3
    # identical peak sets, except where the twin's own values are within 4x the response tolerance
    # of a tie (none on these tiles, but a float32 device may resolve such a tie either way)
    differ = got != want
    assert not (differ & ~ambiguous(want_best, 3, 0.05, 4 * RESP_ATOL)).any()


# --------------------------------------------------------------------------- errors, bench, PTX
@pytest.mark.parametrize("call, error, match", [
    (lambda: hematoxylin(np.zeros((2, 2, 3), np.float32), H_ROW), TypeError, "uint8"),
    (lambda: hematoxylin(np.zeros((2, 2, 4), np.uint8), H_ROW), ValueError, r"\(\.\.\., 3\)"),
    (lambda: hematoxylin(np.zeros((2, 2, 3), np.uint8), H_ROW[:2]), ValueError, "h_row"),
    (lambda: hematoxylin(np.zeros((2, 2, 3), np.uint8), H_ROW, io=0.0), ValueError, "io"),
    (lambda: best_log_response(np.zeros((2, 2), np.float32), [1.0]), ValueError, r"\(N, H, W\)"),
    (lambda: best_log_response(np.zeros((1, 2, 2), np.float64), [1.0]), TypeError, "float32"),
    (lambda: best_log_response(np.zeros((1, 2, 2), np.float32), []), ValueError, "sigmas"),
    (lambda: best_log_response(np.zeros((1, 2, 2), np.float32), [1.0, -1.0]), ValueError, "sigmas"),
    (lambda: peak_mask(np.zeros((1, 2, 2), np.float32), window_px=4, threshold=0.0), ValueError, "odd"),
    (lambda: peak_mask(np.zeros((1, 2, 2), np.int32), window_px=3, threshold=0.0), TypeError, "float"),
    (lambda: gaussian_taps(0.0, 2), ValueError, "sigma"),
])
def test_bad_input(call: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_bench_cases_run_their_twins() -> None:
    from gpupath_kernels.nuclei import bench_cases

    cases = bench_cases()
    assert [c.name for c in cases] == ["nuclei_hematoxylin", "nuclei_best_log_response", "nuclei_peak_mask"]
    for case in cases:
        args = case.make_input(np.random.default_rng(0), 1000)  # one small tile
        assert case.bytes_moved(args) > 0
        assert case.run_twin(*args) is not None


_PTX_BODY = """    from gpupath_kernels import nuclei
    f32a, f32c = T.Array(T.float32, 3, "A"), T.float32[:, :, ::1]
    for idx64 in (False, True):
        k = nuclei._kernels(idx64)
        sigs = {
            "hema": (T.Array(T.uint8, 4, "A"), T.float32[::1], T.float32, T.float32, T.float32, f32c),
            "along_rows": (f32a, T.float32[::1], T.float32[::1], f32c, f32c),
            "along_cols": (f32c, f32c, T.float32[::1], T.float32[::1], T.float32, T.int64, f32c, T.int8[:, :, ::1]),
            "peaks": (f32a, T.int64, T.float32, T.uint8[:, :, ::1]),  # threshold in best's precision
        }
        for name, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(k[name].py_func, sig, cc=(9, 0))
            assert ".f64" not in ptx, f"{name}: float64 arithmetic in a float32 kernel"
        cuda.compile_ptx(k["peaks"].py_func, (T.Array(T.float64, 3, "A"), T.int64, T.float64, T.uint8[:, :, ::1]),
                         cc=(9, 0))
    print("OK")
"""


def test_kernels_compile_for_the_gpu() -> None:
    """Type inference and PTX for sm_90 (the simulator runs Python and checks no types)."""
    assert_compiles_for_gpu(_PTX_BODY)


@pytest.mark.gpu
def test_device_detector_on_strided_tiles() -> None:
    import cupy

    rng = np.random.default_rng(3)
    tiles = np.stack([he_tile(DISCS, rng), he_tile(DISCS[1:], rng)])
    host = classic.detect_nuclei(tiles, mpp=MPP)
    dev_tiles = cupy.asarray(np.concatenate([tiles, tiles], axis=-1))[..., :3]  # channel stride 6 B
    dev = classic.detect_nuclei(dev_tiles, mpp=MPP)
    np.testing.assert_array_equal(dev.tile_index, host.tile_index)
    np.testing.assert_allclose(dev.cx_px, host.cx_px, atol=1e-3)  # float32 response in the parabola fit
    np.testing.assert_allclose(dev.cy_px, host.cy_px, atol=1e-3)
    np.testing.assert_allclose(dev.score, host.score, atol=1e-4)


@pytest.mark.gpu
def test_device_detector_on_real_tiles() -> None:
    """detect_nuclei's device branch (all three kernels) on real H&E tiles. Only CuPy tiles reach it, so
    it needs a GPU (skipped without one, with the reason). On the CPU, the same kernels on the same
    tiles are test_chain_on_real_tiles_gives_the_twins_peaks, under the simulator."""
    import cupy

    tiles = real_tiles()
    params = classic.ClassicParams(radius_um=(1.5, 3.0), n_scales=2, threshold=0.05)
    host = classic.detect_nuclei(tiles, mpp=1.0, params=params)
    assert len(host.cx_px) >= 3
    dev = classic.detect_nuclei(cupy.asarray(tiles), mpp=1.0, params=params)
    np.testing.assert_array_equal(dev.tile_index, host.tile_index)
    np.testing.assert_allclose(dev.cx_px, host.cx_px, atol=1e-3)   # float32 response in the parabola fit
    np.testing.assert_allclose(dev.cy_px, host.cy_px, atol=1e-3)
    np.testing.assert_array_equal(dev.radius_px, host.radius_px)
    np.testing.assert_allclose(dev.score, host.score, atol=1e-4)   # as test_device_detector_on_strided_tiles
