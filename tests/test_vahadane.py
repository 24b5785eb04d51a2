"""Tests of gpupath.vahadane: known answers, self-normalisation, errors, and agreement with staintools.

Every test that touches arrays runs on NumPy and, where a CUDA device answers, on CuPy (compared
with the NumPy result). Real H&E comes from cmu-1-small-region.svs in the shared test data
(``GPUPATH_TEST_DATA``, default ``../shared/data`` beside the checkout).

The peer is staintools 2.1.2 (``VahadaneStainExtractor``: SPAMS ``trainDL`` dictionary learning,
lambda 0.1, CIELAB lightness < 0.8 tissue mask, OD = -ln(I / 255); concentrations by SPAMS
``lasso``, lambda 0.01) with SPAMS 2.6.14 from the ``spams-bin`` wheel. It needs a stack of its
own, so the test builds a venv under ``.cache/peers/`` in the repo root (git-ignored; built once,
13 s here) and runs the peer in a subprocess; without a network the build fails and the test
skips, naming the failed step.
"""

from __future__ import annotations

import math
import subprocess
import tomllib
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import data_file
from peer_venv import peer_python as build_peer_python
from gpupath_kernels.vahadane import nn_lasso_ref, vahadane_apply_ref
from stain_helpers import (
    CMU_SMALL,
    CMU_TILES_XY,
    STAINS_A,
    STAINS_B,
    TILE_PX,
    beer_lambert,
    synthetic_conc,
)

from gpupath._xp import array_module, to_host
from gpupath.slide import open_slide
from gpupath.stain import StainFit
from gpupath.vahadane import (
    CONC_LAM,
    VAHADANE_REFERENCE,
    _learn_stains,
    apply_vahadane,
    fit_vahadane,
)

IO = 240.0

# the peer's pins live in pyproject.toml's `peers-staintools` extra (one place to change them)
_PEER_EXTRA = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
    "project"]["optional-dependencies"]["peers-staintools"]
PEER_SPEC = next(p for p in _PEER_EXTRA if p.startswith("staintools=="))  # installed with --no-deps
PEER = PEER_SPEC.replace("==", "-")
PEER_PINS = [p for p in _PEER_EXTRA if p != PEER_SPEC]
PEER_DIR = Path(__file__).resolve().parents[1] / ".cache" / "peers" / PEER
PEER_TARGET_TILE = 1  # index in CMU_TILES_XY of the tile both normalisers render to
PEER_ITER = 3000  # SPAMS trainDL iterations (mini-batches) for the peer, see _PEER_SCRIPT


@pytest.fixture(scope="module")
def cmu_tiles() -> np.ndarray:
    """(7, 256, 256, 3) uint8 real H&E tiles."""
    with open_slide(data_file(CMU_SMALL)) as slide:
        return np.stack([slide.read_rgb(xy, 0, (TILE_PX, TILE_PX)) for xy in CMU_TILES_XY])


def _angles_deg(fitted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Angle in degrees between matching columns of two (3, 2) matrices."""
    cos = (fitted * truth).sum(0) / np.linalg.norm(fitted, axis=0) / np.linalg.norm(truth, axis=0)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("stains", [STAINS_A, STAINS_B], ids=["A", "B"])
def test_fit_recovers_known_stains(xp: types.ModuleType, stains: np.ndarray) -> None:
    """Beer-Lambert image of two known stains with sparse concentrations.

    The L1 term pulls the fitted vectors into the data cone in proportion to lam (the known
    bias of sparse NMF): measured 1.1..1.5 degrees at lam = 0.1 (staintools on the same images:
    2.1..3.0) and 0.12..0.16 degrees at lam = 0.01, where uint8 quantisation is what is left.
    """
    rgb = xp.asarray(beer_lambert(stains, synthetic_conc(np.random.default_rng(1), (200, 300))))
    fit = fit_vahadane(rgb)
    w = fit.stain_matrix_od
    assert (np.cos(np.radians(_angles_deg(w, stains))) > 0.99).all()  # the criterion
    assert (_angles_deg(w, stains) < 2.0).all()
    assert (w >= 0).all() and w[0, 0] > w[0, 1]  # non-negative, hematoxylin first
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-12)
    assert (_angles_deg(fit_vahadane(rgb, lam=0.01).stain_matrix_od, stains) < 0.3).all()


def test_self_normalisation_is_near_identity(xp: types.ModuleType) -> None:
    """Normalising an image to its own fit re-renders it, up to what non-negative coding loses.

    Pure-stain pixels lie up to ~1.5 degrees outside the cone of a lam = 0.1 fit (see above) and
    are coded onto its edge; CONC_LAM = 0.01 shrinks every concentration a little. Measured on
    these images: mean |diff| 1.40..1.48, max 6 grey levels at lam = 0.1; 0.80..0.81, max 2 at
    lam = 0.01.
    """
    rng = np.random.default_rng(1)
    for stains in (STAINS_A, STAINS_B):
        rgb = beer_lambert(stains, synthetic_conc(rng, (200, 300)))
        for lam, mean_max, max_max in ((0.1, 2.0, 8), (0.01, 1.0, 3)):
            fit = fit_vahadane(xp.asarray(rgb), lam=lam)
            diff = np.abs(to_host(apply_vahadane(xp.asarray(rgb), fit, target=fit)).astype(np.int16) - rgb)
            assert diff.mean() < mean_max and diff.max() <= max_max, (lam, diff.mean(), diff.max())


def test_two_stainings_of_the_same_tissue_normalise_alike(xp: types.ModuleType) -> None:
    conc = synthetic_conc(np.random.default_rng(3), (128, 128))
    a, b = beer_lambert(STAINS_A, conc), beer_lambert(STAINS_B, conc)
    out = [to_host(apply_vahadane(xp.asarray(x), fit_vahadane(xp.asarray(x)))).astype(np.int16) for x in (a, b)]
    assert np.abs(a.astype(np.int16) - b).mean() > 10  # measured 13.9 before normalisation
    assert np.abs(out[0] - out[1]).mean() < 1.0  # measured 0.35 after


# --------------------------------------------------------------------------- host path, twin, device


def test_host_path_is_the_twin(cmu_tiles: np.ndarray) -> None:
    rgb = cmu_tiles[0]
    fit = fit_vahadane(rgb)
    od = np.log(IO / (rgb.reshape(-1, 3).astype(np.float32) + 1))  # od_from_rgb's float32 OD
    conc = nn_lasso_ref(od, fit.stain_matrix_od, CONC_LAM)
    np.testing.assert_allclose(fit.max_conc, np.percentile(conc, 99.0, axis=0), rtol=1e-6)
    scale = VAHADANE_REFERENCE.max_conc / fit.max_conc
    want = vahadane_apply_ref(rgb.reshape(-1, 3), fit.stain_matrix_od, VAHADANE_REFERENCE.stain_matrix_od,
                              scale, CONC_LAM, IO, VAHADANE_REFERENCE.io)  # fmt: skip
    np.testing.assert_array_equal(apply_vahadane(rgb, fit), want.reshape(rgb.shape))


@pytest.mark.parametrize("shape", [(1, 64, 64, 3), (3, 40, 56, 3), (64, 48, 3)])
def test_dtype_shape_device_preserved(xp: types.ModuleType, shape: tuple[int, ...]) -> None:
    rgb_host = beer_lambert(STAINS_A, synthetic_conc(np.random.default_rng(11), shape[:-1]))
    rgb = xp.asarray(rgb_host)
    fit = fit_vahadane(rgb)
    out = apply_vahadane(rgb, fit)
    assert array_module(out) is xp and out.dtype == np.uint8 and out.shape == rgb.shape
    assert fit.stain_matrix_od.dtype == np.float64 and isinstance(fit.stain_matrix_od, np.ndarray)
    if xp is not np:  # device fit and rendering equal the host ones up to float rounding, which
        # may move the stop (|dW| <= tol = 1e-5) by one iteration: ~1e-5 in W, ~1e-3 degrees
        host_fit = fit_vahadane(rgb_host)
        assert (_angles_deg(fit.stain_matrix_od, host_fit.stain_matrix_od) < 0.01).all()
        np.testing.assert_allclose(fit.max_conc, host_fit.max_conc, rtol=1e-3)
        assert np.abs(to_host(out).astype(np.int16) - apply_vahadane(rgb_host, host_fit)).max() <= 1


def test_non_contiguous_input(xp: types.ModuleType, cmu_tiles: np.ndarray) -> None:
    view = xp.asarray(cmu_tiles[:2])[:, ::-1, ::2]  # mirrored rows, every other column
    copy = xp.ascontiguousarray(view)
    fit_v, fit_c = fit_vahadane(view), fit_vahadane(copy)
    out_v, out_c = to_host(apply_vahadane(view, fit_v)), to_host(apply_vahadane(copy, fit_c))
    if xp is np:
        np.testing.assert_array_equal(fit_v.stain_matrix_od, fit_c.stain_matrix_od)
        np.testing.assert_array_equal(out_v, out_c)
    else:  # float64 atomics in the Gram sums: equal up to summation order (see above)
        assert (_angles_deg(fit_v.stain_matrix_od, fit_c.stain_matrix_od) < 0.01).all()
        assert np.abs(out_v.astype(np.int16) - out_c).max() <= 1


def test_fit_is_deterministic_with_a_fixed_rng(cmu_tiles: np.ndarray) -> None:
    rgb = cmu_tiles  # 7 tiles, ~230k tissue px: the 100k default sample is drawn
    a = fit_vahadane(rgb, rng=np.random.default_rng(5))
    b = fit_vahadane(rgb, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a.stain_matrix_od, b.stain_matrix_od)
    np.testing.assert_array_equal(a.max_conc, b.max_conc)
    default = fit_vahadane(rgb)  # rng=None is default_rng(0)
    seed0 = fit_vahadane(rgb, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(default.stain_matrix_od, seed0.stain_matrix_od)
    # a sample moves the vectors a little: 100k of the ~230k tissue px by 0.44 degrees (H) from
    # the all-pixel fit, 20k by 0.4..1.1 (measured over 6 seeds; 5k: up to 3.8)
    every_px = fit_vahadane(rgb, max_pixels=10**7)
    assert (_angles_deg(default.stain_matrix_od, every_px.stain_matrix_od) < 1.0).all()
    small = [fit_vahadane(rgb, max_pixels=20_000, rng=np.random.default_rng(s)) for s in (1, 2)]
    assert not np.array_equal(small[0].stain_matrix_od, small[1].stain_matrix_od)
    for fit in small:
        assert (_angles_deg(fit.stain_matrix_od, every_px.stain_matrix_od) < 1.5).all()


def test_reference_is_the_fit_of_cmu1_small_region() -> None:
    with open_slide(data_file(CMU_SMALL)) as slide:
        rgb = slide.read_rgb((0, 0), 0, slide.dimensions)
    fit = fit_vahadane(rgb)
    np.testing.assert_allclose(fit.stain_matrix_od, VAHADANE_REFERENCE.stain_matrix_od, atol=1e-4)
    np.testing.assert_allclose(fit.max_conc, VAHADANE_REFERENCE.max_conc, atol=1e-4)
    assert VAHADANE_REFERENCE.io == IO


# --------------------------------------------------------------------------- errors


def test_fit_without_enough_tissue_raises(xp: types.ModuleType) -> None:
    rgb = np.full((64, 64, 3), 250, dtype=np.uint8)
    rgb[:10, :10] = beer_lambert(STAINS_A, np.full((10, 10, 2), 0.8))  # 100 tissue px
    with pytest.raises(ValueError, match=r"fit_vahadane: .*too few tissue pixels: 100 of 4096 .* need at least 500"):
        fit_vahadane(xp.asarray(rgb))


def test_single_stain_is_not_separable(xp: types.ModuleType) -> None:
    one_colour = beer_lambert(STAINS_A, np.full((40, 40, 2), 0.7))
    with pytest.raises(ValueError, match=r"stains not separable: one of the two fitted stains is zero in all 1600"):
        fit_vahadane(xp.asarray(one_colour))
    conc = np.zeros((40, 40, 2))
    conc[..., 0] = np.linspace(0.2, 1.5, 1600).reshape(40, 40)  # hematoxylin only, varying amount
    with pytest.raises(ValueError, match=r"stains not separable"):
        fit_vahadane(xp.asarray(beer_lambert(STAINS_A, conc)))


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda rgb: fit_vahadane(rgb.astype(np.float32)), TypeError,
                 r"rgb: expected uint8 RGB, got dtype float32", id="fit-float-rgb"),
    pytest.param(lambda rgb: apply_vahadane(np.zeros((32, 32, 4), np.uint8), VAHADANE_REFERENCE), ValueError,
                 r"expected shape \(H, W, 3\) or \(N, H, W, 3\), got \(32, 32, 4\)", id="apply-four-channels"),
    pytest.param(lambda rgb: fit_vahadane(rgb, lam=-0.1), ValueError,
                 r"lam: expected a finite L1 weight >= 0 \(OD units\), got -0.1", id="fit-negative-lam"),
    pytest.param(lambda rgb: fit_vahadane(rgb, n_iter=0), ValueError,
                 r"n_iter: expected an integer >= 1, got 0", id="fit-zero-n_iter"),
    pytest.param(lambda rgb: fit_vahadane(rgb, max_pixels=2), ValueError,
                 r"max_pixels: expected an integer >= 3, got 2", id="fit-max_pixels-below-3"),
    pytest.param(lambda rgb: fit_vahadane(rgb, io=300), ValueError,
                 r"io: expected 0 < io <= 255 grey levels, got 300", id="fit-io-above-255"),
    pytest.param(lambda rgb: fit_vahadane(rgb, beta=math.nan), ValueError,
                 r"beta: expected a finite OD threshold >= 0, got nan", id="fit-nan-beta"),
    pytest.param(lambda rgb: fit_vahadane(rgb, rng=0), TypeError,  # type: ignore[arg-type]
                 r"rng: expected numpy.random.Generator or None, got int", id="fit-int-rng"),
    pytest.param(lambda rgb: apply_vahadane(rgb, VAHADANE_REFERENCE.stain_matrix_od), TypeError,  # type: ignore[arg-type]
                 r"source, target: expected StainFit, got ndarray, StainFit", id="apply-matrix-not-fit"),
])
def test_bad_arguments_raise(call: Callable[[np.ndarray], object], error: type[Exception], match: str) -> None:
    rgb = beer_lambert(STAINS_A, synthetic_conc(np.random.default_rng(0), (32, 32)))
    with pytest.raises(error, match=match):
        call(rgb)


# --------------------------------------------------------------------------- peer: staintools


_PEER_SCRIPT = """
import functools, sys, numpy as np, spams
# trainDL's default budget (iter=-1) is one wall-clock second on all cores: on a loaded machine
# the result is unconverged and moves by degrees between runs. A fixed count on one thread is
# deterministic; everything else is as staintools calls it.
spams.trainDL = functools.partial(spams.trainDL, iter=PEER_ITER, numThreads=1)
from staintools import StainNormalizer, VahadaneStainExtractor
from staintools.tissue_masks.luminosity_threshold_tissue_locator import LuminosityThresholdTissueLocator
tiles, target = np.load(sys.argv[1]), int(sys.argv[3])
# staintools' OD conversion writes into its input (I[I == 0] = 1): hand it copies
stains = np.stack([VahadaneStainExtractor.get_stain_matrix(t.copy()).T for t in tiles])
masks = np.stack([LuminosityThresholdTissueLocator.get_tissue_mask(t) for t in tiles])
norm = StainNormalizer("vahadane")
norm.fit(tiles[target].copy())
out = np.stack([norm.transform(t.copy()) for t in tiles])
np.savez(sys.argv[2], stains=stains, masks=masks, normalised=out)
""".replace("PEER_ITER", str(PEER_ITER))


@pytest.fixture(scope="session")
def peer_python() -> Path:
    """Python of a venv with staintools 2.1.2 + SPAMS, built once under .cache/peers/ (PyPI needed)."""
    return build_peer_python(PEER_DIR, peer=PEER, pins=PEER_PINS, imports="staintools, spams", no_deps=[PEER_SPEC])


def _objective(od: np.ndarray, w: np.ndarray, lam: float) -> float:
    """0.5 ||V - W H||^2 + lam ||H||_1 at the exact H for W: the cost both solvers minimise."""
    h = nn_lasso_ref(od, w, lam)
    return float(0.5 * ((od - h @ w.T) ** 2).sum() + lam * h.sum())


def test_matches_staintools_vahadane(peer_python: Path, cmu_tiles: np.ndarray, tmp_path: Path) -> None:
    """Stain vectors and normalised images against staintools 2.1.2 on 7 real H&E tiles.

    The peer runs SPAMS' online dictionary learning for PEER_ITER mini-batches on one thread
    (deterministic; see _PEER_SCRIPT). Measured here, all deterministic:

    * Same pixels, OD (-ln(I/255), floored at 1e-6), mask (CIELAB L < 0.8) and lambda: our
      vectors are within 0.44 degrees of the peer's (median 0.08) and our cost is never higher
      (the peer's online solver stops a little short of the optimum): bound 0.6 degrees.
    * Each with its defaults (ours: OD = -ln((I+1)/240), tissue OD >= 0.15 in all channels):
      0.4..1.6 degrees, within the issue's 3. The mask alone or the OD formula alone moves our
      vectors by up to ~2 degrees.
    * Normalised to tile 1 with the peer's stain vectors and its OD and rendering
      (floor(255 exp(-OD))), our concentration coding (exact non-negative lasso, CONC_LAM)
      gives the peer's images exactly: it is SPAMS' lasso(pos=True, lambda1=0.01).
    * Each normaliser end to end: mean absolute error 0.4..3.2 grey levels with our io=255 (we
      render rint(io exp(-OD) - 1) and code OD with the +1; with the peer's vectors and our
      conventions it is already 0.4..2.6, so the conventions dominate), 2.4..6.6 with our
      default io=240 (the peer renders glass at 255, we at 239): bounds 4 and 8.
    """
    tiles_npy, result_npz = tmp_path / "tiles.npy", tmp_path / "peer.npz"
    np.save(tiles_npy, cmu_tiles)
    done = subprocess.run(
        [str(peer_python), "-c", _PEER_SCRIPT, str(tiles_npy), str(result_npz), str(PEER_TARGET_TILE)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    peer = np.load(result_npz)

    def peer_od(rgb: np.ndarray) -> np.ndarray:  # staintools' convert_RGB_to_OD, (P, 3)
        return np.maximum(-np.log(np.maximum(rgb.reshape(-1, 3).astype(np.float64), 1) / 255), 1e-6)

    for k, rgb in enumerate(cmu_tiles):
        theirs = peer["stains"][k]  # (3, 2), hematoxylin first (larger red OD), unit columns
        od = peer_od(rgb)[peer["masks"][k].reshape(-1)]
        same_input, _, _ = _learn_stains(od, 0.1, 500, 1e-7)
        same_input = same_input[:, ::-1] if same_input[0, 0] < same_input[0, 1] else same_input
        assert (_angles_deg(same_input, theirs) < 0.6).all(), (k, _angles_deg(same_input, theirs))
        assert _objective(od, same_input, 0.1) <= _objective(od, theirs, 0.1) * (1 + 1e-9)
        ours = fit_vahadane(rgb).stain_matrix_od
        assert (_angles_deg(ours, theirs) < 3.0).all(), (k, _angles_deg(ours, theirs))

    def peer_conc(k: int) -> np.ndarray:
        return nn_lasso_ref(peer_od(cmu_tiles[k]), peer["stains"][k], CONC_LAM)

    target_conc = peer_conc(PEER_TARGET_TILE)
    for k, rgb in enumerate(cmu_tiles):
        conc = peer_conc(k)
        conc *= np.percentile(target_conc, 99, axis=0) / np.percentile(conc, 99, axis=0)
        emulated = np.floor(255 * np.exp(-conc @ peer["stains"][PEER_TARGET_TILE].T)).astype(np.uint8)
        assert np.abs(emulated.reshape(rgb.shape).astype(np.int16) - peer["normalised"][k]).max() <= 1

    for io, mae_max in ((255.0, 4.0), (IO, 8.0)):
        target = fit_vahadane(cmu_tiles[PEER_TARGET_TILE], io=io)
        for k, rgb in enumerate(cmu_tiles):
            ours = apply_vahadane(rgb, fit_vahadane(rgb, io=io), target=target).astype(np.int16)
            mae = np.abs(ours - peer["normalised"][k]).mean()
            assert mae < mae_max, (io, k, mae)


def test_stainfit_is_returned() -> None:
    assert isinstance(VAHADANE_REFERENCE, StainFit)
    assert VAHADANE_REFERENCE.stain_matrix_od[0, 0] > VAHADANE_REFERENCE.stain_matrix_od[0, 1]
