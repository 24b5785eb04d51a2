"""Classic nuclei detector: colour deconvolution -> hematoxylin -> multi-scale LoG -> peaks -> boxes.

Takes a batch of RGB tiles (N, H, W, 3) uint8 at a known mpp, NumPy or CuPy, and returns one
row per nucleus candidate: tile index, centre (tile px, sub-pixel), radius (tile px), score.
Written once for both array modules (``scipy.ndimage`` / ``cupyx.scipy.ndimage``). It needs no
model, so the pipeline yields real detections before a learned detector is installed.

Method: optical density ``OD = -log(max(I, 1) / 255)``; hematoxylin concentration by colour
deconvolution (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001) with the H and E vectors of
the tiles' stain basis; scale-normalised Laplacian of Gaussian ``-s^2 LoG_s`` at a few scales
spanning the nucleus radius range (Lindeberg 1998: a disc of radius r peaks at s = r / sqrt(2));
local maxima above a threshold; sub-pixel centres by a parabola through each peak's neighbours.

Device: on CuPy tiles the per-pixel stages (hematoxylin, LoG over scales, peak test) are Numba
CUDA kernels (``gpupath_kernels.nuclei``) computing in float32 what the host computes with SciPy in
float64 (responses agree within 1e-5, tested); only the peak coordinates and scores leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupath._xp import array_module, is_device_array, to_host
from gpupath.stain import od_from_rgb
from gpupath_kernels import nuclei as nuclei_kernels

__all__ = ["ClassicParams", "RUIFROK_HE_OD", "hematoxylin_od", "detect_nuclei", "TileNuclei"]

# Ruifrok & Johnston H and E optical-density vectors (columns), unit length.
RUIFROK_HE_OD = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]], np.float64)
RUIFROK_HE_OD /= np.linalg.norm(RUIFROK_HE_OD, axis=0, keepdims=True)


@dataclass(frozen=True, slots=True)
class ClassicParams:
    """Detector settings, physical where they can be."""

    radius_um: tuple[float, float] = (2.5, 5.5)   # nucleus radius range searched
    n_scales: int = 3
    threshold: float = 0.3                        # min scale-normalised LoG response (hematoxylin OD)
    score_scale: float = 0.25                     # response at which score = 0.5 + threshold offset


@dataclass(frozen=True, slots=True)
class TileNuclei:
    """Candidates of one batch, on the host. All (M,) arrays."""

    tile_index: np.ndarray   # int64 index into the batch
    cx_px: np.ndarray        # float64 tile px (pixel c covers [c, c+1))
    cy_px: np.ndarray        # float64 tile px
    radius_px: np.ndarray    # float64 tile px
    score: np.ndarray        # float32 in [0.5, 1) (0.5 at the threshold)


def _deconvolution_matrix(stain_matrix_od: np.ndarray) -> np.ndarray:
    """(3, 3) matrix mapping OD rows to (H, E, residual) concentrations."""
    h, e = stain_matrix_od[:, 0], stain_matrix_od[:, 1]
    third = np.cross(h, e)
    third /= np.linalg.norm(third)
    return np.linalg.inv(np.stack([h, e, third]))


def hematoxylin_od(tiles: Any, *, stain_matrix_od: np.ndarray = RUIFROK_HE_OD) -> Any:
    """Hematoxylin concentration per pixel.

    Parameters
    ----------
    tiles : (..., 3) uint8, NumPy or CuPy.
    stain_matrix_od : (3, 2) H and E unit OD vectors (columns) of the tiles' stain basis.

    Returns
    -------
    (...) float32 on the input's device.
    """
    h_row = _deconvolution_matrix(np.asarray(stain_matrix_od, np.float64))[:, 0]
    if is_device_array(tiles):
        # one fused kernel: OD and the three multiply-adds, no float32 (..., 3) OD image in memory
        return nuclei_kernels.hematoxylin(tiles, h_row)
    od = od_from_rgb(tiles)  # the same optical density as the Macenko fit that gave the stain basis
    # three multiply-adds: no BLAS call, no host array uploaded per batch
    return od[..., 0] * float(h_row[0]) + od[..., 1] * float(h_row[1]) + od[..., 2] * float(h_row[2])


def detect_nuclei(tiles: Any, *, mpp: float, params: ClassicParams = ClassicParams(),
                  stain_matrix_od: np.ndarray = RUIFROK_HE_OD) -> TileNuclei:
    """Nuclei in a batch of tiles.

    Parameters
    ----------
    tiles : (N, H, W, 3) uint8, NumPy or CuPy.
    mpp : µm per tile pixel.
    params : radius range, scales, threshold.
    stain_matrix_od : (3, 2) H and E OD vectors of the tiles (the Macenko target after normalisation).

    Returns
    -------
    TileNuclei on the host (only the candidates leave the device).
    """
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be (N, H, W, 3), got shape {tuple(tiles.shape)}")
    if tiles.dtype != np.uint8:
        raise TypeError(f"tiles must be uint8 RGB, got dtype {tiles.dtype}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    xp = array_module(tiles)
    n = tiles.shape[0]
    if n == 0:
        z = np.zeros(0)
        return TileNuclei(z.astype(np.int64), z, z, z, z.astype(np.float32))
    h = hematoxylin_od(tiles, stain_matrix_od=stain_matrix_od)
    r_min, r_max = (r / mpp for r in params.radius_um)
    radii = np.geomspace(r_min, r_max, params.n_scales)
    sigmas = radii / np.sqrt(2.0)
    window = max(3, 2 * int(r_min) + 1)
    if is_device_array(h):
        # Numba CUDA kernels: separable float32 LoG with the running maximum over scales fused in,
        # then the peak test (window maximum, threshold, border) in one pass
        best, best_scale = nuclei_kernels.best_log_response(h, sigmas.tolist())
        peak = nuclei_kernels.peak_mask(best, window_px=window, threshold=params.threshold)
    else:
        # host: the kernels' NumPy twins are the reference maths (scipy.ndimage, float64 response)
        best, best_scale = nuclei_kernels.best_log_response_ref(h, sigmas.tolist())
        peak = nuclei_kernels.peak_mask_ref(best, window_px=window, threshold=params.threshold)
    t, r, c = xp.nonzero(peak)
    v0 = best[t, r, c].astype(xp.float64)  # the device's float32 response: sub-pixel fit in float64
    dy = _parabola_offset(best[t, r - 1, c].astype(xp.float64), v0, best[t, r + 1, c].astype(xp.float64), xp)
    dx = _parabola_offset(best[t, r, c - 1].astype(xp.float64), v0, best[t, r, c + 1].astype(xp.float64), xp)
    score = 1.0 - xp.exp(-(v0 - params.threshold) / params.score_scale) * 0.5
    # results leave the device here, in one copy: a few numbers per nucleus
    found = to_host(xp.stack([t.astype(xp.float64), c + 0.5 + dx, r + 0.5 + dy,
                              best_scale[t, r, c].astype(xp.float64), score.astype(xp.float64)]))
    return TileNuclei(
        tile_index=found[0].astype(np.int64), cx_px=found[1], cy_px=found[2],
        radius_px=radii[found[3].astype(np.int64)], score=found[4].astype(np.float32),
    )


def _parabola_offset(left: Any, centre: Any, right: Any, xp: Any) -> Any:
    """Sub-pixel offset of a parabola's vertex through three samples, in [-0.5, 0.5]."""
    denom = left - 2.0 * centre + right
    safe = xp.where(xp.abs(denom) > 1e-12, denom, -1.0)
    return xp.clip(0.5 * (left - right) / safe, -0.5, 0.5)
