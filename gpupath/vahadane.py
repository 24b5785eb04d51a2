"""Vahadane stain normalisation of H&E tiles (sparse non-negative matrix factorisation), NumPy or CuPy.

What it does
    Factorises the optical density (OD) of tissue pixels as V ~ W H: W (3 x 2) non-negative
    unit-norm stain vectors (hematoxylin, eosin), H (2 x P) non-negative sparse concentrations,
    minimising ``0.5 * ||V - W H||_F^2 + lam * ||H||_1`` (Vahadane et al. 2016). An image is
    then re-rendered with a target's stain vectors and concentration range, as in
    :mod:`gpupath.stain` (Macenko), so that tiles from differently stained slides look alike.

In and out
    ``rgb``: ``(H, W, 3)`` or ``(N, H, W, 3)`` ``uint8``, NumPy or CuPy. A fit is a
    :class:`gpupath.stain.StainFit` (small ``float64`` host arrays, OD units); normalised
    images come back ``uint8``, same shape, on the input's device.

Device
    ``xp = array_module(rgb)``: OD, tissue selection, sampling, percentiles and reshapes are
    written once for NumPy and CuPy. The per-pixel hot loops go to the NumPy twins of
    :mod:`gpupath_kernels.vahadane` on the host and to its Numba CUDA kernels on the device
    (sparse coding, Gram sums, fused apply). The 2 x 2 / 3 x 2 W update runs on the host
    (``to_host`` of nine sums per iteration, commented at the call).

Conventions (as gpupath.stain unless said)
    * OD = -ln((I + 1) / io) (:func:`gpupath.stain.od_from_rgb`); rendering I = io exp(-OD) - 1,
      rounded to nearest, clipped to 0..255.
    * Tissue pixels: OD >= ``beta`` (default 0.15) in all three channels. (staintools uses
      CIELAB lightness < 0.8 and OD = -ln(I / 255); given its mask and OD our solver finds its
      vectors to within 0.44 degrees at an equal or lower cost, and with our conventions to
      within 1.6 degrees on real H&E: tests/test_vahadane.py.)
    * Column 0 is hematoxylin: the stain vector with the larger red OD.
    * The fit uses at most ``max_pixels`` tissue pixels, drawn without replacement with
      ``rng`` (default ``np.random.default_rng(0)``: the fit is a function of the pixels).
    * Concentrations for ``max_conc`` and for re-rendering are the exact non-negative lasso
      solution per pixel with the fixed, small weight :data:`CONC_LAM` = 0.01 (as staintools'
      ``get_concentrations``): non-negative like the paper's sparse coding, but near least
      squares. An image normalised to its own fit comes back to within ~1.5 grey levels on
      average: lam = 0.1 tilts each fitted vector by ~1.5 degrees into the cone of the data
      (the usual bias of sparse NMF), so pure-stain pixels are coded onto its edge.
    * ``max_conc`` is the 99th percentile of each stain's concentration over all pixels of the
      fitted image (as in gpupath.stain), so tissue must cover well over 1 % of the pixels.

Solver
    Alternating exact block minimisation. H step: the objective separates per pixel into a
    2-unknown non-negative lasso, solved exactly (unconstrained minimiser if positive, else the
    better one-stain solution): the fixed point ISTA/FISTA steps would approach, with no step
    size or iteration count. W step: one sweep of projected block-coordinate descent over the
    columns on the sufficient statistics A = H H^T, B = V H^T (Mairal et al. 2010, alg. 2):
    ``w_k <- P(w_k + (b_k - W a_k) / a_kk)``, P = projection on {w >= 0, ||w|| <= 1}, the
    constraint set of SPAMS' ``trainDL`` (mode 2, modeD 0, posD, posAlpha) that staintools calls.
    Starts from Macenko's reference H&E vectors (deterministic), stops after ``n_iter``
    iterations or when no entry of W moves by more than ``tol``. Columns are finally scaled to
    unit norm (measured: they already sit on the sphere, as the L1 term favours long columns).

References
    A. Vahadane et al., "Structure-preserving color normalization and sparse stain separation
    for histological images", IEEE TMI 35(8):1962-1971, 2016. J. Mairal et al., "Online
    learning for matrix factorization and sparse coding", JMLR 11:19-60, 2010.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from gpupath._xp import array_module, is_device_array, to_host
from gpupath.stain import MIN_TISSUE_FRAC, MIN_TISSUE_PX, REFERENCE, StainFit, od_from_rgb
from gpupath_kernels import vahadane as _kv

__all__ = ["CONC_LAM", "VAHADANE_REFERENCE", "fit_vahadane", "apply_vahadane"]

_log = logging.getLogger(__name__)

CONC_LAM = 0.01
"""L1 weight (OD units) of the concentration coding in ``max_conc`` and :func:`apply_vahadane`."""

_MIN_ANGLE_RAD = 1e-3  # stain vectors closer than this cannot be told apart (as gpupath.stain)
_MIN_MAX_CONC = 1e-6  # a robust maximum concentration at or below this cannot be rescaled
_HOST_CHUNK_PX = 1 << 14  # host px coded at a time: 128 kB temporaries stay in cache (2^16: fit 3x slower)
_W_INIT = REFERENCE.stain_matrix_od / np.linalg.norm(REFERENCE.stain_matrix_od, axis=0)

VAHADANE_REFERENCE = StainFit(
    stain_matrix_od=np.array([[0.8257, 0.3050], [0.4818, 0.8404], [0.2934, 0.4480]]),
    max_conc=np.array([1.5800, 2.5720]),
    io=240.0,
)
"""Default target: ``fit_vahadane`` with its defaults on the whole level 0 (2220 x 2967 px) of
``cmu-1-small-region.svs`` (OpenSlide test data, CMU-1 H&E), rounded to 4 decimals;
tests/test_vahadane.py re-derives it from the slide."""


# --------------------------------------------------------------------------- validation


def _as_array(rgb: ArrayLike) -> Any:
    return rgb if is_device_array(rgb) else np.asarray(rgb)


def _check_rgb(arr: Any, name: str) -> None:
    if arr.dtype != np.uint8:
        raise TypeError(f"{name}: expected uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape (H, W, 3) or (N, H, W, 3), got {tuple(arr.shape)}")


def _check_fit_params(
    io: float, beta: float, lam: float, n_iter: int, tol: float, max_pixels: int,
    rng: Any, min_tissue_px: int, min_tissue_frac: float,
) -> None:  # fmt: skip
    if not 0 < io <= 255:
        raise ValueError(f"io: expected 0 < io <= 255 grey levels, got {io}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta: expected a finite OD threshold >= 0, got {beta}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam: expected a finite L1 weight >= 0 (OD units), got {lam}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int | np.integer) or n_iter < 1:
        raise ValueError(f"n_iter: expected an integer >= 1, got {n_iter!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a finite tolerance >= 0, got {tol}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int | np.integer) or max_pixels < 3:
        raise ValueError(f"max_pixels: expected an integer >= 3, got {max_pixels!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected numpy.random.Generator or None, got {type(rng).__name__}")
    if min_tissue_px < 3:
        raise ValueError(f"min_tissue_px: expected >= 3, got {min_tissue_px}")
    if not 0 <= min_tissue_frac <= 1:
        raise ValueError(f"min_tissue_frac: expected 0 <= min_tissue_frac <= 1, got {min_tissue_frac}")


# --------------------------------------------------------------------------- per-pixel work


def _code(od: Any, w: np.ndarray, lam: float) -> Any:
    """(P, 2) float64 non-negative lasso concentrations of ``od`` (P, 3) under ``w``, on od's device."""
    if is_device_array(od):
        return _kv.nn_lasso(od, w, lam)
    if od.shape[0] <= _HOST_CHUNK_PX:
        return _kv.nn_lasso_ref(od, w, lam)
    out = np.empty((od.shape[0], 2))
    for start in range(0, od.shape[0], _HOST_CHUNK_PX):
        out[start : start + _HOST_CHUNK_PX] = _kv.nn_lasso_ref(od[start : start + _HOST_CHUNK_PX], w, lam)
    return out


def _gram(v: Any, h: Any) -> tuple[np.ndarray, np.ndarray]:
    """Host ``(H^T H, V^T H)``, (2, 2) and (3, 2), of (P, 3) and (P, 2) float64 arrays on either device.

    Two small GEMMs on the arrays' module (cuBLAS on a GPU: the same sums run to run, which
    float atomics would not give, so fits are reproducible) and one copy of nine numbers back.
    """
    xp = array_module(v)
    sums = to_host(xp.concatenate([(h.T @ h).ravel(), (v.T @ h).ravel()]))  # host: the 3x2 W update
    return sums[:4].reshape(2, 2), sums[4:].reshape(3, 2)


def _learn_stains(v: Any, lam: float, n_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray, int]:
    """W (3, 2) host, final diag(H H^T) (2,) and iterations done, for tissue OD ``v`` (P, 3) float64."""
    w = _W_INIT.copy()
    usage, delta, done = np.zeros(2), math.inf, 0
    while done < n_iter and delta > tol:
        hh, vh = _gram(v, _code(v, w, lam))  # H step (exact), then its sufficient statistics
        usage = np.diag(hh).copy()
        w_new = w.copy()
        for k in range(2):  # W step: one projected block-coordinate sweep (host, 3x2)
            if hh[k, k] <= 0:  # no pixel uses stain k: nothing to update it from
                continue
            u = np.maximum(w_new[:, k] + (vh[:, k] - w_new @ hh[:, k]) / hh[k, k], 0.0)
            norm = float(np.linalg.norm(u))
            if norm > 0:  # a zero column would leave W^T W singular; keep the old one
                w_new[:, k] = u / max(norm, 1.0)
        delta = float(np.abs(w_new - w).max())
        w, done = w_new, done + 1
    _log.debug("vahadane: %d of %d iterations, last max |dW| = %.2e", done, n_iter, delta)
    return w, usage, done


def _fit_or_reason(
    arr: Any, io: float, beta: float, lam: float, n_iter: int, tol: float, max_pixels: int,
    rng: np.random.Generator, min_tissue_px: int, min_tissue_frac: float,
) -> StainFit | str:  # fmt: skip
    """Fit of a validated image or batch, or a sentence saying why there is none."""
    xp = array_module(arr)
    od = od_from_rgb(arr, io=io).reshape(-1, 3)  # float32 (P, 3), on the input's device
    n_px = od.shape[0]
    tissue = od[(od >= beta).all(axis=1)]
    n_tissue = int(tissue.shape[0])
    need = max(min_tissue_px, math.ceil(min_tissue_frac * n_px))
    if n_tissue < need:
        return (
            f"too few tissue pixels: {n_tissue} of {n_px} have OD >= beta={beta} in all channels, "
            f"need at least {need} (min_tissue_px={min_tissue_px}, min_tissue_frac={min_tissue_frac})"
        )
    if n_tissue > max_pixels:  # host RNG, so NumPy and CuPy fits draw the same pixels
        keep = np.sort(rng.choice(n_tissue, size=max_pixels, replace=False))
        tissue = tissue[xp.asarray(keep)]  # the indices go to the device once
    v = tissue.astype(xp.float64)

    w, usage, _ = _learn_stains(v, lam, n_iter, tol)
    if not (usage > 0).all():
        return (
            f"stains not separable: one of the two fitted stains is zero in all {v.shape[0]} sampled tissue "
            "pixels (the tissue shows a single colour)"
        )
    w = w / np.linalg.norm(w, axis=0)
    angle = math.acos(min(1.0, float(w[:, 0] @ w[:, 1])))
    if angle < _MIN_ANGLE_RAD:
        return f"stains not separable: the two fitted stain vectors are {angle:.2e} rad apart (< {_MIN_ANGLE_RAD:.0e})"
    if w[0, 0] < w[0, 1]:  # hematoxylin first: larger red OD
        w = w[:, ::-1].copy()

    conc = _code(od, w, CONC_LAM)  # all pixels, as gpupath.stain
    max_conc = to_host(xp.percentile(conc, 99.0, axis=0))  # host: two scalars
    if not (max_conc > _MIN_MAX_CONC).all():
        return (
            f"99th-percentile H, E concentrations {max_conc.round(4).tolist()} not > {_MIN_MAX_CONC:.0e}: "
            f"tissue ({n_tissue} of {n_px} pixels) is too sparse for a robust maximum"
        )
    return StainFit(stain_matrix_od=w, max_conc=max_conc, io=io)


# --------------------------------------------------------------------------- public API


def fit_vahadane(
    rgb: ArrayLike,
    *,
    io: float = 240.0,
    beta: float = 0.15,
    lam: float = 0.1,
    n_iter: int = 200,
    tol: float = 1e-5,
    max_pixels: int = 100_000,
    rng: np.random.Generator | None = None,
    min_tissue_px: int = MIN_TISSUE_PX,
    min_tissue_frac: float = MIN_TISSUE_FRAC,
) -> StainFit:
    """Estimate H and E stain vectors by sparse NMF, and their concentration range (Vahadane 2016).

    Parameters
    ----------
    rgb : (H, W, 3) or (N, H, W, 3) uint8 array, NumPy or CuPy
        One image, or a batch fitted as one pool of pixels (one fit for the batch).
    io : float, optional
        Background transmitted intensity, grey levels (0 < io <= 255).
    beta : float, optional
        OD threshold: only pixels with OD >= beta in all channels are tissue and enter the
        factorisation.
    lam : float, optional
        L1 weight on the concentrations in the factorisation, OD units (>= 0); 0.1 as in the
        paper and staintools.
    n_iter : int, optional
        Most alternating (H, W) iterations; measured 30..100 on 256 x 256 px H&E tiles.
    tol : float, optional
        Stop when no entry of W changes by more than this in one iteration (measured: the
        vectors then lie within 0.01 degrees of the fully converged ones).
    max_pixels : int, optional
        Most tissue pixels used for the factorisation; above, a random sample of this size.
    rng : numpy.random.Generator, optional
        Draws the sample; default ``np.random.default_rng(0)``. A Generator passed twice draws
        different samples.
    min_tissue_px, min_tissue_frac : int, float, optional
        A fit needs at least ``max(min_tissue_px, ceil(min_tissue_frac * n_pixels))`` tissue
        pixels (as :func:`gpupath.stain.fit_macenko`).

    Returns
    -------
    StainFit
        Unit-norm, non-negative stain vectors (hematoxylin first) and the 99th-percentile
        concentrations of all pixels under :data:`CONC_LAM` coding; ``io`` as given.

    Raises
    ------
    TypeError
        ``rgb`` not uint8; ``rng`` not a Generator.
    ValueError
        Bad shape or parameter; too few tissue pixels (the message gives the count and the
        minimum); a stain used by no sampled pixel or two (near-)parallel stain vectors; a
        robust maximum concentration <= 0.

    Notes
    -----
    See the module docstring for the solver. Per-pixel work is float64 on the input's device;
    each iteration brings nine sums to the host. On a GPU the Gram sums use float64 atomics,
    so device fits may differ from host ones (and between runs) in the last bits. Sampling
    moves the vectors a little: on 7 real tiles (230k tissue px) the 100k sample lies 0.44
    degrees from the all-pixel fit. Host time on a 2-core AMD EPYC: 16..70 ms for a 256 x 256
    tile (30..100 iterations), ~0.24 s for a batch of 32 such tiles.

    Examples
    --------
    >>> fit = fit_vahadane(tiles, rng=np.random.default_rng(1))   # doctest: +SKIP
    >>> out = apply_vahadane(tiles, fit)                            # doctest: +SKIP
    """
    arr = _as_array(rgb)
    _check_rgb(arr, "rgb")
    _check_fit_params(io, beta, lam, n_iter, tol, max_pixels, rng, min_tissue_px, min_tissue_frac)
    result = _fit_or_reason(
        arr, io, beta, lam, int(n_iter), tol, int(max_pixels),
        np.random.default_rng(0) if rng is None else rng, min_tissue_px, min_tissue_frac,
    )  # fmt: skip
    if isinstance(result, str):
        raise ValueError(f"fit_vahadane: image of shape {tuple(arr.shape)}: {result}")
    return result


def apply_vahadane(rgb: ArrayLike, source: StainFit, *, target: StainFit = VAHADANE_REFERENCE) -> ArrayLike:
    """Re-render an image from its fitted stains with the target's stains and concentration range.

    Parameters
    ----------
    rgb : (H, W, 3) or (N, H, W, 3) uint8 array, NumPy or CuPy
        Image(s) whose stains ``source`` describes.
    source : StainFit
        Fit of ``rgb`` (or of its slide), e.g. from :func:`fit_vahadane`; ``source.io`` is used
        for the OD.
    target : StainFit, optional
        Stains to render with; default :data:`VAHADANE_REFERENCE`. ``target.io`` is used for
        the rendering.

    Returns
    -------
    out : uint8 array, same shape and device as ``rgb``

    Raises
    ------
    TypeError
        ``rgb`` not uint8, or a fit not a :class:`StainFit`.
    ValueError
        Bad shape.

    Notes
    -----
    Per pixel: OD under ``source.io``; concentrations C = exact non-negative lasso with weight
    :data:`CONC_LAM` under ``source.stain_matrix_od`` (sparse coding as in the paper, with the
    small weight of staintools' apply so that the self-normalisation is near identity; plain
    least squares would give negative concentrations outside the stain cone); C scaled by
    ``target.max_conc / source.max_conc``; out = rint(target.io exp(-M_target C) - 1) clipped
    to 0..255. Pixels brighter than ``io - 1`` (negative OD) code to C = 0 and render as
    ``target.io - 1``. float64 throughout; on the device one fused kernel, on the host its
    NumPy twin in chunks of 2^14 pixels, so both give the same pixels up to the rounding of
    ties (at most 1 grey level).
    """
    if not isinstance(source, StainFit) or not isinstance(target, StainFit):
        raise TypeError(f"source, target: expected StainFit, got {type(source).__name__}, {type(target).__name__}")
    arr = _as_array(rgb)
    _check_rgb(arr, "rgb")
    flat = arr.reshape(-1, 3)  # a view if possible, else a copy (both modules)
    scale = target.max_conc / source.max_conc
    args = (source.stain_matrix_od, target.stain_matrix_od, scale)
    if is_device_array(arr):
        out = _kv.vahadane_apply(flat, *args, lam=CONC_LAM, io_source=source.io, io_target=target.io)
        return out.reshape(arr.shape)
    out = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, flat.shape[0], _HOST_CHUNK_PX):
        part = flat[start : start + _HOST_CHUNK_PX]
        out[start : start + _HOST_CHUNK_PX] = _kv.vahadane_apply_ref(part, *args, CONC_LAM, source.io, target.io)
    return out.reshape(arr.shape)
