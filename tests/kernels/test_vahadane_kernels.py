"""Kernels of gpupath_kernels.vahadane against their NumPy twins, and the twins against first principles.

Without a GPU the kernels run under Numba's CUDA simulator (tests/conftest.py sets
NUMBA_ENABLE_CUDASIM=1), where each CUDA thread is a Python thread: inputs stay at a few hundred
pixels. ``gpu``-marked tests repeat the comparisons on CuPy arrays on a real device.

Tolerances: kernels and twins evaluate the same float64 formulas in a different order, so
concentrations agree to ~1e-15 (measured max 2.4e-15) and Gram sums of up to 601 terms to
~1e-15 relative (measured max 1.1e-13 absolute); 1e-12 leaves room for fused multiply-adds on
a device. Rendered pixels
are equal unless a value sits within an ulp of a .5 rounding tie: at most 1 grey level, and
measured 0 differing of 2652 channel values here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from gpupath._xp import cupy_or_none, gpu_available
from gpupath.slide import open_slide
from gpupath.stain import od_from_rgb
from gpupath.vahadane import CONC_LAM, VAHADANE_REFERENCE
from gpupath_kernels import _launch
from gpupath_kernels import vahadane as kv
from conftest import data_file
from kernel_helpers import assert_compiles_for_gpu

RUIFROK_HE = np.array([[0.650, 0.072], [0.704, 0.990], [0.286, 0.105]])  # Ruifrok & Johnston 2001
RUIFROK_HE /= np.linalg.norm(RUIFROK_HE, axis=0)
SIZES = [1, 3, 5, 17, 257, 601]  # 1 px, odd, below / above the simulator grid (2 x 8) and a 256 block


def _random_od(rng: np.random.Generator, n_px: int, dtype: type = np.float64) -> np.ndarray:
    """(n_px, 3) OD: H, E and mixtures, noise that leaves the stain cone, some negative (bright) px."""
    conc = rng.uniform(0.0, 1.5, (n_px, 2)) * (rng.random((n_px, 2)) < 0.7)
    od = conc @ RUIFROK_HE.T + rng.normal(0.0, 0.05, (n_px, 3))
    od[rng.random(n_px) < 0.1] *= -0.2
    return od.astype(dtype)


def _objective(od: np.ndarray, w: np.ndarray, h: np.ndarray, lam: float) -> np.ndarray:
    return 0.5 * ((od - h @ w.T) ** 2).sum(axis=1) + lam * h.sum(axis=1)


@pytest.fixture(scope="module")
def cmu_rgb() -> np.ndarray:
    """(20, 25, 3) uint8 real H&E from cmu-1-small-region.svs at level-0 (x=1100, y=700)."""
    with open_slide(data_file("cmu-1-small-region.svs")) as slide:
        return slide.read_rgb((1100, 700), 0, (25, 20))


# --------------------------------------------------------------------------- twins vs first principles


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.1])
def test_nn_lasso_ref_is_the_exact_minimiser(lam: float) -> None:
    """The closed form beats (or ties) 3000 FISTA steps (step 1/||W^T W||, soft-threshold, clip)
    and every perturbed feasible point: it is the minimiser, not an approximation."""
    rng = np.random.default_rng(2016)
    od = _random_od(rng, 400)
    h = kv.nn_lasso_ref(od, RUIFROK_HE, lam)
    assert h.shape == (400, 2) and h.dtype == np.float64 and (h >= 0).all()

    g = RUIFROK_HE.T @ RUIFROK_HE
    step = 1.0 / np.linalg.eigvalsh(g).max()
    x = y = np.zeros_like(h)
    t = 1.0
    for _ in range(3000):
        x_new = np.maximum(y - step * (y @ g - od @ RUIFROK_HE) - step * lam, 0.0)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = x_new + (t - 1) / t_new * (x_new - x)
        x, t = x_new, t_new
    f_closed, f_fista = _objective(od, RUIFROK_HE, h, lam), _objective(od, RUIFROK_HE, x, lam)
    assert (f_closed <= f_fista + 1e-12).all()
    np.testing.assert_allclose(h, x, atol=1e-9)  # FISTA converges to it (measured 1.6e-15)
    for _ in range(20):
        probe = np.maximum(h + rng.normal(0, 1e-3, h.shape), 0)
        assert (f_closed <= _objective(od, RUIFROK_HE, probe, lam) + 1e-15).all()


def test_nn_lasso_ref_parallel_columns_and_pure_stains() -> None:
    pure = np.array([[1.0 * RUIFROK_HE[:, 0]], [0.8 * RUIFROK_HE[:, 1]]]).reshape(2, 3)
    h = kv.nn_lasso_ref(pure, RUIFROK_HE, 0.0)
    np.testing.assert_allclose(h, [[1.0, 0.0], [0.0, 0.8]], atol=1e-12)
    twin_cols = np.stack([RUIFROK_HE[:, 0], RUIFROK_HE[:, 0]], axis=1)  # det(W^T W) = 0
    h = kv.nn_lasso_ref(pure, twin_cols, 0.0)
    assert np.isfinite(h).all() and (h[:, 1] == 0).all()  # ties go to the first stain
    np.testing.assert_allclose(h[0, 0], 1.0, atol=1e-12)


# --------------------------------------------------------------------------- kernels vs twins


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_px", SIZES)
def test_nn_lasso_kernel_matches_twin(dtype: type, n_px: int) -> None:
    od = _random_od(np.random.default_rng(n_px), n_px, dtype)
    got = kv.nn_lasso(od, RUIFROK_HE, 0.1)
    assert got.shape == (n_px, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got, kv.nn_lasso_ref(od, RUIFROK_HE, 0.1), rtol=1e-12, atol=1e-12)


def test_nn_lasso_kernel_non_contiguous_real_pixels(cmu_rgb: np.ndarray) -> None:
    od = od_from_rgb(cmu_rgb).reshape(-1, 3)  # 500 real px, float32, some negative (glass)
    padded = np.zeros((od.shape[0], 5), np.float32)
    padded[:, 1:4] = od
    strided = padded[::-1, 1:4]  # negative row stride, column offset: not C-contiguous
    assert not strided.flags.c_contiguous
    w = VAHADANE_REFERENCE.stain_matrix_od
    got = kv.nn_lasso(strided, w, 0.1)
    np.testing.assert_allclose(got, kv.nn_lasso_ref(od[::-1], w, 0.1), rtol=1e-12, atol=1e-12)
    assert (got[:, 0] > 0).any() and (got[:, 1] > 0).any()  # real H&E: both stains present


def test_empty_inputs_have_defined_shapes() -> None:
    empty = np.zeros((0, 3))
    assert kv.nn_lasso(empty, RUIFROK_HE, 0.1).shape == (0, 2)
    out = kv.vahadane_apply(np.zeros((0, 3), np.uint8), RUIFROK_HE, RUIFROK_HE, np.ones(2),
                            lam=0.01, io_source=240.0, io_target=240.0)  # fmt: skip
    assert out.shape == (0, 3) and out.dtype == np.uint8


def _apply_args(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    target = VAHADANE_REFERENCE.stain_matrix_od
    scale = rng.uniform(0.6, 1.6, 2)
    return target, RUIFROK_HE, scale, {"lam": CONC_LAM, "io_source": 240.0, "io_target": 230.0}


@pytest.mark.parametrize("n_px", SIZES)
def test_apply_kernel_matches_twin(n_px: int) -> None:
    rng = np.random.default_rng(7 * n_px)
    rgb = rng.integers(0, 256, (n_px, 3), dtype=np.uint8)  # includes 0, 255, glass brighter than io
    src, tgt, scale, kw = _apply_args(rng)
    got = kv.vahadane_apply(rgb, src, tgt, scale, **kw)
    want = kv.vahadane_apply_ref(rgb, src, tgt, scale, kw["lam"], kw["io_source"], kw["io_target"])
    assert got.shape == (n_px, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max(initial=0) <= 1 and (diff == 0).mean() >= 0.999


def test_apply_kernel_real_pixels_non_contiguous(cmu_rgb: np.ndarray) -> None:
    rgb = cmu_rgb[:, ::-1].reshape(-1, 3)[::3]  # mirrored then every third pixel: a strided view
    assert not rgb.flags.c_contiguous
    src, tgt, scale, kw = _apply_args(np.random.default_rng(3))
    got = kv.vahadane_apply(rgb, src, tgt, scale, **kw)
    want = kv.vahadane_apply_ref(np.ascontiguousarray(rgb), src, tgt, scale, kw["lam"], 240.0, 230.0)
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


@pytest.mark.parametrize(("io_target", "want"), [(100.5, 100), (101.5, 100), (102.5, 102)])
def test_apply_kernel_rounds_ties_to_even(io_target: float, want: int) -> None:
    """Glass (OD <= 0) codes to C = 0 and renders as io_target - 1 exactly: an x.5 tie, as np.rint."""
    rgb = np.full((5, 3), 255, np.uint8)
    got = kv.vahadane_apply(rgb, RUIFROK_HE, RUIFROK_HE, np.ones(2), lam=CONC_LAM, io_source=240.0,
                            io_target=io_target)  # fmt: skip
    ref = kv.vahadane_apply_ref(rgb, RUIFROK_HE, RUIFROK_HE, np.ones(2), CONC_LAM, 240.0, io_target)
    assert (got == want).all() and (ref == want).all()


def test_apply_kernel_clips_to_uint8() -> None:
    rgb = np.array([[0, 0, 0], [5, 40, 9], [255, 255, 255]], np.uint8)  # dark, dark, glass
    darker = (RUIFROK_HE, np.array([4.0, 4.0]), 0)  # 4x the concentrations: far below 0
    brighter = (-RUIFROK_HE, np.ones(2), 255)  # negative target OD: far above 255
    for tgt, scale, clipped in (darker, brighter):
        got = kv.vahadane_apply(rgb, RUIFROK_HE, tgt, scale, lam=CONC_LAM, io_source=240.0, io_target=240.0)
        np.testing.assert_array_equal(got, kv.vahadane_apply_ref(rgb, RUIFROK_HE, tgt, scale, CONC_LAM, 240.0, 240.0))
        assert (got[:2] == clipped).all() and (got[2] == 239).all()  # glass: C = 0, io - 1


def test_apply_twin_identity_for_in_cone_pixels() -> None:
    """Pixels rendered from non-negative concentrations under W come back through W with lam=0."""
    rng = np.random.default_rng(9)
    conc = rng.uniform(0.05, 1.2, (300, 2))
    rgb = np.clip(np.rint(240.0 * np.exp(-conc @ RUIFROK_HE.T) - 1), 0, 255).astype(np.uint8)
    back = kv.vahadane_apply_ref(rgb, RUIFROK_HE, RUIFROK_HE, np.ones(2), 0.0, 240.0, 240.0)
    assert np.abs(back.astype(np.int16) - rgb).max() <= 1  # uint8 quantisation moves px off the plane


# --------------------------------------------------------------------------- validation, bench cases


_OD, _RGB = np.zeros((4, 3)), np.zeros((4, 3), np.uint8)  # four pixels: OD (float64) and RGB (uint8)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: kv.nn_lasso(_OD.astype(np.int64), RUIFROK_HE, 0.1), TypeError,
                 r"od: expected float32 or float64, got dtype int64", id="lasso-int-od"),
    pytest.param(lambda: kv.nn_lasso(np.zeros((4, 4)), RUIFROK_HE, 0.1), ValueError,
                 r"od: expected shape \(P, 3\), got \(4, 4\)", id="lasso-four-channel-od"),
    pytest.param(lambda: kv.nn_lasso(_OD, RUIFROK_HE.T, 0.1), ValueError,
                 r"stain_matrix_od: expected a finite \(3, 2\) .*, got shape \(2, 3\)", id="lasso-transposed-stains"),
    pytest.param(lambda: kv.nn_lasso(_OD, np.zeros((3, 2)), 0.1), ValueError,
                 r"stain columns must be non-zero", id="lasso-zero-stains"),
    pytest.param(lambda: kv.nn_lasso(_OD, RUIFROK_HE, -0.1), ValueError,
                 r"lam: expected a finite L1 weight >= 0, got -0.1", id="lasso-negative-lam"),
    pytest.param(lambda: kv.vahadane_apply(_OD, RUIFROK_HE, RUIFROK_HE, np.ones(2), lam=0.01, io_source=240.0,
                                           io_target=240.0), TypeError,
                 r"rgb: expected uint8, got dtype float64", id="apply-float-rgb"),
    pytest.param(lambda: kv.vahadane_apply(_RGB, RUIFROK_HE, RUIFROK_HE, np.ones(3), lam=0.01, io_source=240.0,
                                           io_target=240.0), ValueError,
                 r"conc_scale: expected 2 finite values", id="apply-three-conc-scales"),
    pytest.param(lambda: kv.vahadane_apply(_RGB, RUIFROK_HE, RUIFROK_HE, np.ones(2), lam=0.01, io_source=240.0,
                                           io_target=0), ValueError,
                 r"io_target: expected 0 < io <= 255 grey levels, got 0", id="apply-zero-io_target"),
])
def test_wrappers_reject_bad_input(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_bench_cases_run_on_the_host() -> None:
    cases = kv.bench_cases()
    assert [c.name for c in cases] == ["vahadane.nn_lasso", "vahadane.apply"]
    for case in cases:
        assert isinstance(case, _launch.BenchCase)
        args = case.make_input(np.random.default_rng(0), 40)
        assert args[0].shape[0] == 40 and case.bytes_moved(args) > 0
        want = case.run_twin(*args)
        got = case.run(*args)  # NumPy input: the kernel under the simulator
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), atol=1)


# --------------------------------------------------------------------------- on a device


@pytest.mark.gpu
def test_kernels_on_cupy_match_twins(cmu_rgb: np.ndarray) -> None:
    if not gpu_available():
        pytest.skip("needs a CUDA device (gpupath._xp.gpu_available() is False)")
    cp = cupy_or_none()
    rng = np.random.default_rng(5)
    for n_px in (*SIZES, 1_000_003):
        od = _random_od(rng, n_px)
        h = kv.nn_lasso(cp.asarray(od), RUIFROK_HE, 0.1)
        assert isinstance(h, cp.ndarray)
        np.testing.assert_allclose(h.get(), kv.nn_lasso_ref(od, RUIFROK_HE, 0.1), rtol=1e-12, atol=1e-12)
        strided = kv.nn_lasso(cp.asarray(od.astype(np.float32))[::2], RUIFROK_HE, 0.1).get()
        np.testing.assert_allclose(strided, kv.nn_lasso_ref(od.astype(np.float32)[::2], RUIFROK_HE, 0.1), atol=1e-12)
    rgb = np.concatenate([cmu_rgb.reshape(-1, 3), rng.integers(0, 256, (999_999, 3), dtype=np.uint8)])
    src, tgt, scale, kw = _apply_args(rng)
    got = kv.vahadane_apply(cp.asarray(rgb)[::3], src, tgt, scale, **kw).get()  # strided, read in place
    want = kv.vahadane_apply_ref(rgb[::3], src, tgt, scale, kw["lam"], 240.0, 230.0)
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


_PTX_BODY = """
from gpupath_kernels import vahadane
k = vahadane._kernels()
f8, u1 = T.float64, T.uint8
for od_t in (T.float32[:, ::1], T.float64[:, ::1]):
    cuda.compile_ptx(k.nn_lasso.py_func, (od_t, f8, f8, f8, f8, f8, f8, f8, T.float64[:, ::1]), cc=(9, 0))
ptx, _ = cuda.compile_ptx(k.apply.py_func, (u1[:, ::1], *(f8,) * 17, u1[:, ::1]), cc=(9, 0))
assert "ld.local" not in ptx and "st.local" not in ptx, "apply: local memory"
print("OK")
"""


def test_kernels_compile_for_the_gpu() -> None:
    """Type inference and PTX for sm_90 (the simulator runs Python and checks no types)."""
    assert_compiles_for_gpu(_PTX_BODY)
