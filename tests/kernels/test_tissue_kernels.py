"""Tissue kernel (saturation, grey, candidates, histogram) vs its NumPy twin, and Otsu from the histogram.

Runs the Numba kernel under the CUDA simulator on NumPy arrays (no GPU), and on CuPy arrays when a
GPU is present (``gpu`` mark). Inputs are small: the simulator runs every CUDA thread as a Python
thread. Tolerance everywhere: exact (the kernel's float32 operations are the twin's, see
gpupath_kernels.tissue).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpupath.tissue as tissue_stage
from conftest import data_file
from gpupath.slide import open_slide
from conftest import Backend
from kernel_helpers import assert_compiles_for_gpu
from gpupath_kernels.tissue import N_BINS, otsu_from_histogram, tissue_features, tissue_features_ref


def random_rgb(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Uniform uint8 RGB plus the corner cases: black, white, glass, pure red (saturation exactly 1)."""
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    specials = np.array([[0, 0, 0], [255, 255, 255], [236, 236, 236], [200, 0, 0], [26, 25, 25]], np.uint8)
    flat = rgb.reshape(-1, 3)
    k = min(len(flat), len(specials))
    flat[:k] = specials[:k]
    return rgb


def assert_features_equal(got: tuple[Any, ...], want: tuple[np.ndarray, ...], backend: Backend) -> None:
    sat, grey, cand, hist = (backend.get(a) for a in got)
    w_sat, w_grey, w_cand, w_hist = want
    assert sat.dtype == np.float32 and grey.dtype == np.float32 and cand.dtype == bool and hist.dtype == np.int64
    np.testing.assert_array_equal(sat, w_sat)      # exact: same float32 ops, correctly rounded division
    np.testing.assert_array_equal(grey, w_grey)    # exact: integer sum / 3, one rounding
    np.testing.assert_array_equal(cand, w_cand)
    np.testing.assert_array_equal(hist, w_hist)    # exact: integer counts
    assert hist.shape == (N_BINS,)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (24, 30)])  # 24 x 30 = 720 px: more than one 256-thread block
def test_features_match_twin(backend: Backend, shape: tuple[int, int]) -> None:
    rgb = random_rgb(np.random.default_rng(sum(shape)), shape)
    assert_features_equal(tissue_features(backend.put(rgb)), tissue_features_ref(rgb), backend)


def test_features_with_other_grey_bounds(backend: Backend) -> None:
    rgb = random_rgb(np.random.default_rng(7), (9, 11))
    got = tissue_features(backend.put(rgb), max_grey=200.5, min_grey=60.25)
    assert_features_equal(got, tissue_features_ref(rgb, max_grey=200.5, min_grey=60.25), backend)


def test_features_non_contiguous_input(backend: Backend) -> None:
    rgba = random_rgb(np.random.default_rng(3), (20, 26))
    rgba = np.concatenate([rgba, np.zeros((20, 26, 1), np.uint8)], axis=-1)
    rgb = rgba[1::2, ::-2, :3]  # row step 2, reversed columns, channel stride 1 of 4
    assert not rgb.flags.c_contiguous
    assert_features_equal(tissue_features(backend.put(rgb)), tissue_features_ref(rgb), backend)


def test_features_on_real_overview(backend: Backend) -> None:
    slide = open_slide(data_file("cmu-1-small-region.svs"))
    overview, _ = tissue_stage.read_overview(slide, 96.0)  # (31, 24, 3): tissue and glass
    assert overview.shape == (31, 24, 3)
    got = tissue_features(backend.put(overview))
    want = tissue_features_ref(overview)
    assert_features_equal(got, want, backend)
    # the threshold from the kernel's histogram is the host stage's threshold, exactly
    sat, grey, _, _ = want
    assert otsu_from_histogram(backend.get(got[3])) == tissue_stage.otsu_threshold(sat[grey > 25.0])


@pytest.mark.parametrize("seed", range(4))
def test_otsu_from_histogram_is_the_host_threshold(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lo, hi = rng.uniform(0.02, 0.3), rng.uniform(0.4, 0.9)
    values = np.concatenate([rng.normal(lo, 0.03, 400), rng.normal(hi, 0.05, 300)]).clip(0, 1).astype(np.float32)
    hist, _ = np.histogram(values, bins=N_BINS, range=(0.0, 1.0))
    assert otsu_from_histogram(hist) == tissue_stage.otsu_threshold(values)


def test_otsu_plateau_takes_its_middle() -> None:
    # two spikes with empty bins between: every split between them is equally good
    values = np.r_[np.full(50, 0.1015625), np.full(50, 0.5015625)]  # in bins 26 and 128
    hist, _ = np.histogram(values, bins=N_BINS, range=(0.0, 1.0))
    # the plateau is bins 26..127; its middle bin is 76
    assert otsu_from_histogram(hist) == tissue_stage.otsu_threshold(values) == (76 + 0.5) / 256


@pytest.mark.parametrize("rgb, error, match", [
    (np.zeros((4, 4), np.uint8), ValueError, r"\(H, W, 3\)"),
    (np.zeros((4, 4, 4), np.uint8), ValueError, r"\(H, W, 3\)"),
    (np.zeros((4, 4, 3), np.float32), TypeError, "uint8"),
])
def test_bad_input(rgb: np.ndarray, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tissue_features(rgb)


def test_bad_histogram() -> None:
    with pytest.raises(ValueError, match=r"\(256,\)"):
        otsu_from_histogram(np.zeros(10))


def test_bench_cases_run_their_twin() -> None:
    from gpupath_kernels.tissue import bench_cases

    (case,) = bench_cases()
    args = case.make_input(np.random.default_rng(0), 100)
    assert args[0].dtype == np.uint8 and args[0].shape == (10, 10, 3)
    out = case.run_twin(*args)  # sat, grey (float32), candidates (bool), histogram (int64): the kernel's dtypes
    assert [a.dtype for a in out] == [np.float32, np.float32, np.bool_, np.int64]
    # counted from the arrays: the RGB read once, the three per-pixel outputs and the histogram written once
    assert case.bytes_moved(args) == args[0].nbytes + sum(a.nbytes for a in out)
    rgb = args[0].astype(np.int64)
    assert out[3].sum() == (rgb.sum(axis=-1) > 3 * 25).sum()  # every pixel brighter than black (grey > 25), once


_PTX_BODY = """    from gpupath_kernels import tissue
    for idx64 in (False, True):
        kernel = tissue._features_kernel(idx64)
        ptx, _ = cuda.compile_ptx(kernel.py_func, (T.Array(T.uint8, 3, "A"), T.float32, T.float32,
                                  T.float32[:, ::1], T.float32[:, ::1], T.uint8[:, ::1], T.int64[::1]), cc=(9, 0))
        assert "atom.shared.add.u32" in ptx and "div.rn.f32" in ptx, "shared atomics, IEEE division"
    print("OK")
"""


def test_kernel_compiles_for_the_gpu() -> None:
    """Type inference and PTX for sm_90 (the simulator runs Python and checks no types)."""
    assert_compiles_for_gpu(_PTX_BODY)


@pytest.mark.gpu
@pytest.mark.parametrize("overview_um", [16.0, 96.0])
def test_device_mask_is_host_mask(overview_um: float) -> None:
    """tissue_mask's device branch (kernel + host Otsu on its histogram). Only a CuPy overview reaches it,
    so it needs a GPU (skipped without one, with the reason). On the CPU, test_features_on_real_overview
    checks what that branch computes (the kernel's features and its histogram's Otsu) under the simulator."""
    import cupy

    slide = open_slide(data_file("cmu-1-small-region.svs"))
    overview, _ = tissue_stage.read_overview(slide, overview_um)
    host = tissue_stage.tissue_mask(overview)
    assert 0.1 < host.mean() < 0.9  # tissue and glass: a threshold that matters
    dev = tissue_stage.tissue_mask(cupy.asarray(overview))
    assert isinstance(dev, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(dev), host)  # same features and threshold: same mask
