"""Macenko stain normalisation of H&E tiles: NumPy on the host, hand kernels on a CUDA device.

What it does
    Estimates the two stain vectors (hematoxylin, eosin) of an RGB image or batch in optical
    density (OD) space and re-renders the image with the stain vectors and concentration range
    of a target, so that tiles from differently stained slides look alike to a detector.

In and out
    ``rgb`` / ``tiles``: ``(H, W, 3)`` or ``(N, H, W, 3)`` ``uint8`` arrays, NumPy or CuPy.
    Normalised images come back with the same shape, ``uint8``, on the input's device.
    A fit is a :class:`StainFit`: small ``float64`` host arrays (OD units, dimensionless).

Device
    Host (NumPy) input: the code below, written once with ``xp = array_module(rgb)``; it is the
    reference the device kernels are checked against (and agrees with torchstain). Device (CuPy)
    input: :func:`fit_macenko`, :func:`apply_macenko` and :func:`normalize_batch` hand the
    per-pixel passes to the Numba kernels of ``gpupath_kernels.macenko`` (OD statistics, angle
    and concentration histograms, one fused re-rendering), a per-tile batch in one launch per
    pass. Its percentiles come from histograms: stain vectors within 0.022 deg of this path's,
    max_conc within a bound the kernels return (~1e-6 OD on 256 x 256 px tiles) of the exact
    percentile, pixels within 1 grey level. Only 3x3 / 3x2 matrices, per-block sums, order
    statistics' bins and a few scalars come to the host.

Conventions (fixed here, relied on by callers)
    * OD = -ln((I + 1) / io), ``I`` in grey levels 0..255, ``io`` the background transmitted
      intensity (default 240). This is the formula of Macenko's reference code and torchstain;
      the inverse used for re-rendering is I = io * exp(-OD) - 1, so an image normalised to its
      own fit comes back unchanged (up to rounding and the projection onto the stain plane).
    * Tissue pixels: OD >= ``beta`` in all three channels (the complement of torchstain's
      "any channel < beta").
    * Column 0 of the stain matrix is hematoxylin: of the two extreme vectors, the one with the
      larger red OD component.
    * Eigenvector signs: the principal one points into the positive OD octant (positive sum),
      the second has its largest-magnitude component positive. The fit is therefore a function
      of the pixel values alone.
    * max_conc is the 99th percentile of each stain's concentration over *all* pixels of the
      fitted image (as in the reference code), so tissue must cover well over 1 % of the pixels:
      a fit needs at least ``max(min_tissue_px, ceil(min_tissue_frac * n_px))`` tissue pixels
      (defaults 500 and 1 %).

References
    M. Macenko et al., "A method for normalizing histology slides for quantitative analysis",
    ISBI 2009, pp. 1107-1110. Reference vectors and concentrations from that work's code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from gpupath._xp import array_module, is_device_array, to_host

__all__ = [
    "StainFit",
    "REFERENCE",
    "MIN_TISSUE_PX",
    "MIN_TISSUE_FRAC",
    "od_from_rgb",
    "fit_macenko",
    "apply_macenko_reference",
    "apply_macenko",
    "normalize_batch",
    "fit_macenko_device",
    "fit_tiles_device",
    "apply_macenko_device",
    "apply_tiles_device",
    "fit_pixel_groups",
]

_log = logging.getLogger(__name__)

MIN_TISSUE_PX = 500  # tissue pixels a fit needs at least (absolute)
MIN_TISSUE_FRAC = 0.01  # ... and at least this fraction of all pixels (the 99th percentile rule)
_MIN_ANGLE_SPREAD_RAD = 1e-3  # extreme stain vectors closer than this cannot be told apart
_MIN_MAX_CONC = 1e-6  # a robust maximum concentration at or below this cannot be rescaled


@dataclass(frozen=True, slots=True, eq=False)
class StainFit:
    """Stain vectors and concentration range of one image, batch or slide.

    Attributes
    ----------
    stain_matrix_od : (3, 2) float64 ndarray
        Columns are the hematoxylin and eosin stain vectors in OD space (R, G, B rows), each of
        (near) unit length, all components >= 0 for a proper H&E fit. Host array, read-only.
    max_conc : (2,) float64 ndarray
        Robust maximum (99th percentile) of the H and E concentrations, OD units per unit stain
        vector; both > 0. Host array, read-only.
    io : float
        Background transmitted intensity in grey levels (0 < io <= 255) with which the OD was
        computed, e.g. 240.

    Notes
    -----
    Equality is identity (``eq=False``): compare fits with ``np.allclose`` on the fields.
    """

    stain_matrix_od: np.ndarray
    max_conc: np.ndarray
    io: float

    def __post_init__(self) -> None:
        matrix = np.array(self.stain_matrix_od, dtype=np.float64)  # a private copy
        conc = np.array(self.max_conc, dtype=np.float64)
        if matrix.shape != (3, 2) or not np.isfinite(matrix).all():
            raise ValueError(f"StainFit.stain_matrix_od: expected finite (3, 2), got {matrix!r}")
        if conc.shape != (2,) or not np.isfinite(conc).all() or not (conc > 0).all():
            raise ValueError(f"StainFit.max_conc: expected 2 finite values > 0, got {conc!r}")
        io = float(self.io)
        if not 0 < io <= 255:
            raise ValueError(f"StainFit.io: expected 0 < io <= 255 grey levels, got {io}")
        matrix.setflags(write=False)
        conc.setflags(write=False)
        object.__setattr__(self, "stain_matrix_od", matrix)
        object.__setattr__(self, "max_conc", conc)
        object.__setattr__(self, "io", io)


REFERENCE = StainFit(
    stain_matrix_od=np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    max_conc=np.array([1.9705, 1.0308]),
    io=240.0,
)
"""Macenko's standard H&E target (also torchstain's default reference)."""


# --------------------------------------------------------------------------- validation


def _as_array(rgb: ArrayLike) -> Any:
    """Device arrays as they are, anything else as a NumPy array (no copy if already one)."""
    return rgb if is_device_array(rgb) else np.asarray(rgb)


def _check_rgb(rgb: Any, name: str, ndims: tuple[int, ...]) -> None:
    if rgb.dtype != np.uint8:
        raise TypeError(f"{name}: expected uint8 RGB, got dtype {rgb.dtype}")
    if rgb.ndim not in ndims or rgb.shape[-1] != 3:
        want = " or ".join({3: "(H, W, 3)", 4: "(N, H, W, 3)"}.get(n, f"{n}-d (..., 3)") for n in ndims)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(rgb.shape)}")


def _check_fit_params(io: float, beta: float, alpha: float, min_tissue_px: int, min_tissue_frac: float) -> None:
    if not 0 < io <= 255:
        raise ValueError(f"io: expected 0 < io <= 255 grey levels, got {io}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta: expected a finite OD threshold >= 0, got {beta}")
    if not 0 <= alpha < 50:
        raise ValueError(f"alpha: expected a percentile 0 <= alpha < 50, got {alpha}")
    if min_tissue_px < 3:
        raise ValueError(f"min_tissue_px: expected >= 3 (a plane needs 3 points), got {min_tissue_px}")
    if not 0 <= min_tissue_frac <= 1:
        raise ValueError(f"min_tissue_frac: expected 0 <= min_tissue_frac <= 1, got {min_tissue_frac}")


# --------------------------------------------------------------------------- maths


def _od(rgb: Any, io: float, dtype: Any) -> Any:
    """OD = -ln((I + 1) / io) in ``dtype``, same shape and device as ``rgb``.

    Written as ln(io / (I + 1)): the same value, without a -0.0 at I = io - 1.
    """
    xp = array_module(rgb)
    return xp.log(dtype(io) / (rgb.astype(dtype) + 1))


def _concentrations(od: Any, stain_matrix_od: np.ndarray) -> Any:
    """Least-squares concentrations C of OD = M C for every pixel.

    ``od`` is (P, 3) on either device; returns (P, 2) there. The normal equations
    (M^T M) C = M^T od share one 2x2 matrix for all pixels, so its solution operator
    (M^T M)^-1 M^T (2x3) is formed once on the host and applied to all pixels at once in xp.
    """
    xp = array_module(od)
    m = np.asarray(stain_matrix_od, dtype=np.float64)
    pinv = np.linalg.solve(m.T @ m, m.T)  # (2, 3) host: the same 2x2 system for every pixel
    return od @ xp.asarray(pinv.T, dtype=od.dtype)


# Why a fit fails, one sentence each; shared with the device path (gpupath_kernels.macenko).
def _reason_too_few(
    n_tissue: int, n_px: int, beta: float, need: int, min_tissue_px: int, min_tissue_frac: float
) -> str:
    return (
        f"too few tissue pixels: {n_tissue} of {n_px} have OD >= beta={beta} in all channels, "
        f"need at least {need} (min_tissue_px={min_tissue_px}, min_tissue_frac={min_tissue_frac})"
    )


def _reason_not_separable(alpha: float, n_tissue: int, phi_lo: float, phi_hi: float) -> str:
    return (
        f"stains not separable: the {alpha}th..{100 - alpha}th percentile angles of {n_tissue} "
        f"tissue pixels span {phi_hi - phi_lo:.2e} rad < {_MIN_ANGLE_SPREAD_RAD:.0e} rad"
    )


def _reason_sparse(max_conc: np.ndarray, n_tissue: int, n_px: int) -> str:
    return (
        f"99th-percentile H, E concentrations {np.asarray(max_conc).round(4).tolist()} not > {_MIN_MAX_CONC:.0e}: "
        f"tissue ({n_tissue} of {n_px} pixels) is too sparse for a robust maximum"
    )


def _fit_or_reason(
    rgb: Any, io: float, beta: float, alpha: float, min_tissue_px: int, min_tissue_frac: float
) -> StainFit | str:
    """Fit of a validated image or batch, or a sentence saying why there is none."""
    xp = array_module(rgb)
    od = _od(rgb, io, xp.float64).reshape(-1, 3)
    n_px = od.shape[0]
    tissue = od[(od >= beta).all(axis=1)]
    n_tissue = int(tissue.shape[0])
    need = max(min_tissue_px, math.ceil(min_tissue_frac * n_px))
    if n_tissue < need:
        return _reason_too_few(n_tissue, n_px, beta, need, min_tissue_px, min_tissue_frac)

    centred = tissue - tissue.mean(axis=0)
    # host: the 3x3 covariance and its eigen-decomposition (tiny; eigh on host is exact enough)
    cov = to_host(centred.T @ centred) / (n_tissue - 1)
    _, vecs = np.linalg.eigh(cov)  # eigenvalues ascending
    e1, e2 = vecs[:, 2], vecs[:, 1]  # principal, second
    if e1.sum() < 0:  # tissue OD is positive: make it project onto +e1
        e1 = -e1
    if e2[np.argmax(np.abs(e2))] < 0:  # any fixed rule: flipping e2 mirrors phi, same two vectors
        e2 = -e2

    plane = np.stack([e1, e2], axis=1)  # (3, 2)
    proj = tissue @ xp.asarray(plane)  # (P_tissue, 2)
    # positive-octant OD projects onto +e1, so phi lies in (-pi/2, pi/2), far from the +-pi cut
    phi = xp.arctan2(proj[:, 1], proj[:, 0])
    # host: two scalar angles, then the 2-vector maths
    phi_lo, phi_hi = (float(v) for v in to_host(xp.percentile(phi, xp.asarray([alpha, 100.0 - alpha]))))
    if phi_hi - phi_lo < _MIN_ANGLE_SPREAD_RAD:
        return _reason_not_separable(alpha, n_tissue, phi_lo, phi_hi)
    v_lo = plane @ np.array([math.cos(phi_lo), math.sin(phi_lo)])
    v_hi = plane @ np.array([math.cos(phi_hi), math.sin(phi_hi)])
    # hematoxylin first: the extreme vector with the larger red OD (ties: v_hi, as in the reference)
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)
    stain_matrix = np.stack([h, e], axis=1)

    conc = _concentrations(od, stain_matrix)  # all pixels, as in the reference
    max_conc = to_host(xp.percentile(conc, 99.0, axis=0))  # host: two scalars
    if not (max_conc > _MIN_MAX_CONC).all():
        return _reason_sparse(max_conc, n_tissue, n_px)
    return StainFit(stain_matrix_od=stain_matrix, max_conc=max_conc, io=io)


# --------------------------------------------------------------------------- public API


def od_from_rgb(rgb: ArrayLike, *, io: float = 240.0) -> ArrayLike:
    """Optical density of RGB pixels.

    Parameters
    ----------
    rgb : (..., 3) uint8 array, NumPy or CuPy
        Intensities in grey levels 0..255.
    io : float, optional
        Background transmitted intensity in grey levels, 0 < io <= 255.

    Returns
    -------
    od : (..., 3) float32 array on the input's device
        ``-ln((rgb + 1) / io)``, dimensionless; 0 at ``rgb = io - 1``, negative above.

    Raises
    ------
    TypeError
        ``rgb`` is not uint8.
    ValueError
        Last axis is not 3, or ``io`` out of range.

    Examples
    --------
    >>> od_from_rgb(np.array([[0, 239, 255]], np.uint8), io=240.0).round(4)
    array([[ 5.4806,  0.    , -0.0645]], dtype=float32)
    """
    arr = _as_array(rgb)
    if arr.dtype != np.uint8:
        raise TypeError(f"rgb: expected uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"rgb: expected shape (..., 3), got {tuple(arr.shape)}")
    if not 0 < io <= 255:
        raise ValueError(f"io: expected 0 < io <= 255 grey levels, got {io}")
    return _od(arr, io, array_module(arr).float32)


def fit_macenko(
    rgb: ArrayLike,
    *,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_tissue_px: int = MIN_TISSUE_PX,
    min_tissue_frac: float = MIN_TISSUE_FRAC,
) -> StainFit:
    """Estimate H and E stain vectors and their concentration range (Macenko 2009).

    Parameters
    ----------
    rgb : (H, W, 3) or (N, H, W, 3) uint8 array, NumPy or CuPy
        One image, or a batch (e.g. a sample of one slide's tissue tiles) fitted as one pool of
        pixels, giving one fit for the whole batch.
    io : float, optional
        Background transmitted intensity, grey levels.
    beta : float, optional
        OD threshold: pixels with OD < beta in any channel are background and not used for the
        stain vectors.
    alpha : float, optional
        Percentile (0..50) of the stain-plane angles taken as the extreme (pure-stain) directions;
        ``100 - alpha`` is the other.
    min_tissue_px, min_tissue_frac : int, float, optional
        A fit needs at least ``max(min_tissue_px, ceil(min_tissue_frac * n_pixels))`` tissue pixels.

    Returns
    -------
    StainFit
        ``io`` is the one given here.

    Raises
    ------
    TypeError
        ``rgb`` is not uint8.
    ValueError
        Bad shape or parameter; too few tissue pixels (the message gives the count and the
        minimum); stain vectors that cannot be separated; a robust maximum concentration <= 0.

    Notes
    -----
    Tissue OD is mean-centred, its 3x3 covariance eigen-decomposed (float64, host) and the
    tissue projected onto the plane of the two largest eigenvectors. The angles at the
    ``alpha`` and ``100 - alpha`` percentiles (linear interpolation) give the two stain vectors,
    hematoxylin first (larger red OD). Concentrations of all pixels follow by least squares and
    ``max_conc`` is their 99th percentile. Per-pixel work runs in float64 on the input's device.
    On a device array the percentiles come from on-device histograms (see the module notes):
    stain vectors within 3.8e-4 rad of the exact percentile, max_conc within the bound
    ``gpupath_kernels.macenko.concentrations_max`` states.
    Apart from deterministic eigenvector signs (which do not change the result) this is the
    computation of the paper's reference code and of torchstain's NumPy backend.

    Examples
    --------
    >>> fit = fit_macenko(tiles)                      # doctest: +SKIP
    >>> fit.stain_matrix_od.shape, fit.max_conc.shape # doctest: +SKIP
    ((3, 2), (2,))
    """
    arr = _as_array(rgb)
    if is_device_array(arr):  # per-pixel passes as hand kernels; validates as below
        return fit_macenko_device(
            arr, io=io, beta=beta, alpha=alpha, min_tissue_px=min_tissue_px, min_tissue_frac=min_tissue_frac
        )
    _check_rgb(arr, "rgb", (3, 4))
    _check_fit_params(io, beta, alpha, min_tissue_px, min_tissue_frac)
    result = _fit_or_reason(arr, io, beta, alpha, min_tissue_px, min_tissue_frac)
    if isinstance(result, str):
        raise ValueError(f"fit_macenko: image of shape {tuple(arr.shape)}: {result}")
    return result


def apply_macenko(rgb: ArrayLike, source: StainFit, *, target: StainFit = REFERENCE) -> ArrayLike:
    """Re-render an image from its fitted stains with the target's stains and concentration range.

    Parameters
    ----------
    rgb : (H, W, 3) or (N, H, W, 3) uint8 array, NumPy or CuPy
        Image(s) whose stains ``source`` describes.
    source : StainFit
        Fit of ``rgb`` (or of the slide it comes from). ``source.io`` is used for the OD.
    target : StainFit, optional
        Stains to render with; default Macenko's standard :data:`REFERENCE`. ``target.io`` is
        used for the re-rendering.

    Returns
    -------
    out : uint8 array, same shape and device as ``rgb``

    Raises
    ------
    TypeError
        ``rgb`` is not uint8, or a fit is not a :class:`StainFit`.
    ValueError
        Bad shape.

    Notes
    -----
    C = least-squares concentrations of OD under ``source.stain_matrix_od``, scaled per stain by
    ``target.max_conc / source.max_conc``; out = ``target.io * exp(-M_target C) - 1``, rounded
    to nearest and clipped to [0, 255]. Per-pixel maths in float32. Differs from torchstain,
    which re-renders with ``io * exp(-M C)`` and truncates: ours is the exact inverse of the OD
    formula, theirs is on average 0.5 grey level higher (see tests/test_stain.py).
    """
    _check_fits(source, target)
    arr = _as_array(rgb)
    if is_device_array(arr):  # one fused kernel
        return apply_macenko_device(arr, source, target)
    _check_rgb(arr, "rgb", (3, 4))
    return _apply_host(arr, source, target)


def apply_macenko_reference(arr: np.ndarray, source: StainFit, target: StainFit) -> np.ndarray:
    """The NumPy definition of :func:`apply_macenko` on the host (several passes; the tests' reference
    for the compiled path :func:`_apply_host`)."""
    xp = array_module(arr)
    f32 = xp.float32
    conc = _concentrations(_od(arr, source.io, f32).reshape(-1, 3), source.stain_matrix_od)
    conc *= xp.asarray(target.max_conc / source.max_conc, dtype=f32)
    od_out = conc @ xp.asarray(target.stain_matrix_od.T, dtype=f32)  # (P, 3)
    out = f32(target.io) * xp.exp(-od_out) - 1
    return xp.clip(xp.rint(out), 0, 255).astype(xp.uint8).reshape(arr.shape)


def _apply_host(arr: np.ndarray, source: StainFit, target: StainFit) -> np.ndarray:
    """:func:`apply_macenko` on the host in one fused pass (the compiled CPU kernel of
    ``gpupath_kernels.macenko``): the NumPy definition's pixels within 1 grey level."""
    from gpupath_kernels import macenko as mk

    px = np.ascontiguousarray(arr).reshape(1, -1, 3)
    out = mk.apply_groups(px, source.stain_matrix_od[None], source.max_conc[None], target.stain_matrix_od,
                          target.max_conc, io_in=source.io, io_out=target.io, active=[True], on_host=True)
    return out.reshape(arr.shape)


def normalize_batch(
    tiles: ArrayLike,
    *,
    method: Literal["none", "macenko"],
    mode: Literal["slide", "tile"] = "slide",
    fit: StainFit | None = None,
    target: StainFit = REFERENCE,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_tissue_px: int = MIN_TISSUE_PX,
    min_tissue_frac: float = MIN_TISSUE_FRAC,
) -> ArrayLike:
    """Stain-normalise a batch of tiles.

    Parameters
    ----------
    tiles : (N, H, W, 3) uint8 array, NumPy or CuPy
    method : {"none", "macenko"}
        ``"none"`` returns the input array itself (same object, no copy).
    mode : {"slide", "tile"}, optional
        ``"slide"``: one fit for all tiles, ``fit`` if given, else fitted on the whole batch.
        ``"tile"``: each tile fitted on its own; a tile that cannot be fitted (too few tissue
        pixels, inseparable stains) is returned unchanged and logged (see Notes).
    fit : StainFit, optional
        Slide fit to use in ``"slide"`` mode (e.g. from :func:`fit_macenko` on a tile sample).
    target : StainFit, optional
        Stains to render with; default :data:`REFERENCE`.
    io, beta, alpha, min_tissue_px, min_tissue_frac : optional
        Fit parameters, as in :func:`fit_macenko`.

    Returns
    -------
    out : (N, H, W, 3) uint8 array on the input's device

    Raises
    ------
    TypeError
        ``tiles`` is not uint8.
    ValueError
        Unknown ``method`` or ``mode``; ``fit`` given with ``mode="tile"``; bad shape or
        parameter; in ``"slide"`` mode without ``fit``, a batch that cannot be fitted.

    Notes
    -----
    Tiles left unchanged in ``"tile"`` mode are reported in one WARNING on the
    ``gpupath.stain`` logger, naming each tile's index and reason (tissue pixel count and the
    minimum). On the host ``"tile"`` mode fits tiles one after another (a loop over tiles, not
    pixels); on a device all tiles are fitted and re-rendered together, one kernel launch per
    pass with the tile index as ``blockIdx.y``.
    """
    if method not in ("none", "macenko"):
        raise ValueError(f"method: expected 'none' or 'macenko', got {method!r}")
    if mode not in ("slide", "tile"):
        raise ValueError(f"mode: expected 'slide' or 'tile', got {mode!r}")
    if fit is not None and mode == "tile":
        raise ValueError("fit: a given StainFit is only used with mode='slide'; pass fit=None for mode='tile'")
    arr = _as_array(tiles)
    _check_rgb(arr, "tiles", (4,))
    if method == "none":
        return arr
    _check_fit_params(io, beta, alpha, min_tissue_px, min_tissue_frac)
    if mode == "slide":
        if fit is None:
            fit = fit_macenko(
                arr, io=io, beta=beta, alpha=alpha, min_tissue_px=min_tissue_px, min_tissue_frac=min_tissue_frac
            )
        return apply_macenko(arr, fit, target=target)

    return _normalize_each_tile(arr, target=target, io=io, beta=beta, alpha=alpha, min_tissue_px=min_tissue_px,
                                min_tissue_frac=min_tissue_frac)


def _normalize_each_tile(arr: Any, *, target: StainFit, io: float, beta: float, alpha: float, min_tissue_px: int,
                         min_tissue_frac: float) -> Any:
    """``normalize_batch(mode="tile")`` of validated tiles: each fitted on its own; one WARNING names the
    tiles left unchanged and why."""
    if is_device_array(arr):  # all tiles in one launch per pass (the tile is blockIdx.y)
        results = fit_tiles_device(
            arr, io=io, beta=beta, alpha=alpha, min_tissue_px=min_tissue_px, min_tissue_frac=min_tissue_frac
        )
        out = apply_tiles_device(arr, [r if isinstance(r, StainFit) else None for r in results], target)
        unchanged = [f"tile {k}: {r}" for k, r in enumerate(results) if isinstance(r, str)]
    else:
        out = np.empty_like(arr)
        unchanged = []
        for k in range(arr.shape[0]):
            result = _fit_or_reason(arr[k], io, beta, alpha, min_tissue_px, min_tissue_frac)
            if isinstance(result, str):
                out[k] = arr[k]
                unchanged.append(f"tile {k}: {result}")
            else:
                out[k] = apply_macenko(arr[k], result, target=target)
    if unchanged:
        _log.warning(
            "normalize_batch(mode='tile'): %d of %d tiles left unchanged; %s",
            len(unchanged),
            arr.shape[0],
            "; ".join(unchanged),
        )
    return out


# --------------------------------------------------------------------------- the kernel path
# The per-pixel passes as the hand-written kernels of gpupath_kernels.macenko (arrays in, arrays
# out); the decisions (which sentence, which StainFit) stay here. Device arrays take this path;
# NumPy input runs it under Numba's CUDA simulator (CI) or on the kernels' NumPy twins.


def fit_pixel_groups(
    px: Any, *, io: float, beta: float, alpha: float, min_tissue_px: int, min_tissue_frac: float,
    use_kernels: bool | None = None,
) -> list[StainFit | str]:
    """A fit, or the sentence saying why there is none, per group of ``(G, P, 3)`` uint8 ``px``.

    ``use_kernels=False`` runs the kernels' NumPy twins (tests at full size).
    """
    from gpupath_kernels import macenko as mk

    n_px = px.shape[1]
    need = max(min_tissue_px, math.ceil(min_tissue_frac * n_px))
    g = mk.fit_groups(px, io=io, beta=beta, alpha=alpha, need_px=need, min_angle_spread_rad=_MIN_ANGLE_SPREAD_RAD,
                      min_max_conc=_MIN_MAX_CONC, use_kernels=use_kernels)
    out: list[StainFit | str] = []
    for k, status in enumerate(g.status.tolist()):
        n_tissue = int(g.n_tissue[k])
        if status == mk.FIT_TOO_FEW:
            out.append(_reason_too_few(n_tissue, n_px, beta, need, min_tissue_px, min_tissue_frac))
        elif status == mk.FIT_NOT_SEPARABLE:
            out.append(_reason_not_separable(alpha, n_tissue, float(g.phi[k, 0]), float(g.phi[k, 1])))
        elif status == mk.FIT_SPARSE:
            out.append(_reason_sparse(g.max_conc[k], n_tissue, n_px))
        else:
            out.append(StainFit(stain_matrix_od=g.stains[k], max_conc=g.max_conc[k], io=io))
    return out


def fit_macenko_device(
    rgb: ArrayLike, *, io: float = 240.0, beta: float = 0.15, alpha: float = 1.0,
    min_tissue_px: int = MIN_TISSUE_PX, min_tissue_frac: float = MIN_TISSUE_FRAC,
) -> StainFit:
    """:func:`fit_macenko` with the per-pixel passes in kernels (one pooled fit).

    Parameters, Returns and Raises as :func:`fit_macenko` (same messages).

    Notes
    -----
    Differs from the NumPy path only by the histogram percentiles: stain vectors within
    ``gpupath_kernels.macenko.ANGLE_BOUND_RAD`` (0.022 deg), max_conc within half a refined bin
    of the exact percentile under the fitted vectors (``concentrations_max``).
    """
    from gpupath_kernels.macenko import group_pixels

    arr = _as_array(rgb)
    _check_rgb(arr, "rgb", (3, 4))
    _check_fit_params(io, beta, alpha, min_tissue_px, min_tissue_frac)
    (result,) = fit_pixel_groups(group_pixels(arr, per_tile=False), io=io, beta=beta, alpha=alpha,
                                 min_tissue_px=min_tissue_px, min_tissue_frac=min_tissue_frac)
    if isinstance(result, str):
        raise ValueError(f"fit_macenko: image of shape {tuple(arr.shape)}: {result}")
    return result


def fit_tiles_device(
    tiles: ArrayLike, *, io: float = 240.0, beta: float = 0.15, alpha: float = 1.0,
    min_tissue_px: int = MIN_TISSUE_PX, min_tissue_frac: float = MIN_TISSUE_FRAC,
) -> list[StainFit | str]:
    """One fit per tile of (N, H, W, 3) uint8 ``tiles``, one launch per pass for the batch.

    Returns N entries: a :class:`StainFit`, or the sentence saying why that tile has none.
    Raises as :func:`fit_macenko_device` for bad arguments.
    """
    from gpupath_kernels.macenko import group_pixels

    arr = _as_array(tiles)
    _check_rgb(arr, "tiles", (4,))
    _check_fit_params(io, beta, alpha, min_tissue_px, min_tissue_frac)
    return fit_pixel_groups(group_pixels(arr, per_tile=True), io=io, beta=beta, alpha=alpha,
                            min_tissue_px=min_tissue_px, min_tissue_frac=min_tissue_frac)


def _check_fits(*fits: object) -> None:
    if not all(isinstance(f, StainFit) for f in fits):
        raise TypeError(f"source, target: expected StainFit, got {', '.join(type(f).__name__ for f in fits)}")


def _apply_device(arr: Any, sources: Sequence[StainFit | None], target: StainFit, per_tile: bool) -> Any:
    from gpupath_kernels import macenko as mk

    io_in = {s.io for s in sources if s is not None}
    if len(io_in) > 1:  # one OD table per launch
        raise ValueError(f"sources: expected one io for all fits, got {sorted(io_in)}")
    if not io_in:
        return arr.copy()
    stains = np.stack([np.zeros((3, 2)) if s is None else s.stain_matrix_od for s in sources])
    max_conc = np.stack([np.ones(2) if s is None else s.max_conc for s in sources])
    out = mk.apply_groups(mk.group_pixels(arr, per_tile=per_tile), stains, max_conc, target.stain_matrix_od,
                          target.max_conc, io_in=io_in.pop(), io_out=target.io,
                          active=[s is not None for s in sources])
    return out.reshape(arr.shape)


def apply_macenko_device(rgb: ArrayLike, source: StainFit, target: StainFit = REFERENCE) -> Any:
    """:func:`apply_macenko` as one fused kernel: uint8, same shape and device as ``rgb``.

    Bit-identical to the NumPy path up to float32 rounding (``exp``, FMA): a pixel whose value
    lies within an ulp of a rounding boundary may differ by 1 grey level.
    """
    _check_fits(source, target)
    arr = _as_array(rgb)
    _check_rgb(arr, "rgb", (3, 4))
    return _apply_device(arr, [source], target, per_tile=False)


def apply_tiles_device(tiles: ArrayLike, sources: Sequence[StainFit | None], target: StainFit = REFERENCE) -> Any:
    """Re-render each tile of (N, H, W, 3) uint8 ``tiles`` from its own fit, one launch.

    ``sources[k]`` is tile k's fit, or None to copy the tile unchanged; all fits share one ``io``.
    """
    arr = _as_array(tiles)
    _check_rgb(arr, "tiles", (4,))
    if len(sources) != arr.shape[0]:
        raise ValueError(f"sources: expected one fit (or None) per tile, {arr.shape[0]}, got {len(sources)}")
    _check_fits(target, *(s for s in sources if s is not None))
    return _apply_device(arr, list(sources), target, per_tile=True)
