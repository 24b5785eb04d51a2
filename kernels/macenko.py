"""Macenko stain normalisation on a CUDA device: Numba kernels, their NumPy twins, wrappers.

What it does
    The per-pixel passes of :mod:`gpupath.stain`'s Macenko fit and re-rendering as four
    hand-written kernels. Pixels come as a ``(G, P, 3)`` uint8 array of G *groups* of P pixels
    (:func:`group_pixels`): one group per tile (per-tile fits) or one for the whole batch (one
    pooled fit). The group is ``blockIdx.y`` of every launch, so a batch of N tiles is fitted
    with one launch per pass, not N.

    ``od_stats``                 OD, tissue mask, and per block: count, 3 sums, 6 second moments
    ``angle_histogram``          stain-plane angle of tissue OD, histogram over [-pi, pi)
    ``concentration_histogram``  least-squares H, E concentrations, histogram in a window;
                                 :func:`concentrations_max` runs it twice (coarse, then refined)
    ``apply``                    concentrations -> rescale -> target stains -> uint8, fused

    OD is a 256-entry table built with gpupath.stain's expression (bit-identical OD). The 3x3
    covariance, eigenvectors and pseudo-inverses are host NumPy (a few numbers per group).

In and out
    CuPy input: kernels on its device, results on that device. NumPy input: the kernels under
    Numba's CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1`` (CI), else the NumPy twins
    (``*_ref``), which state what each kernel computes. Fits come back as arrays
    (:class:`GroupFits`): this package imports nothing of gpupath; the stage builds its StainFits.

Accuracy against the exact percentiles of gpupath.stain (see kernels/README.md, "macenko")
    * Stain angles are bin midpoints of an :data:`N_ANGLE_BINS`-bin histogram over [-pi, pi):
      each stain vector is within pi / N_ANGLE_BINS = 3.8e-4 rad (0.022 deg) of the one the
      exact percentile gives on the same eigenvectors.
    * max_conc: a coarse histogram over the range the OD table allows, then one over the
      bins holding the two order statistics; error <= half a refined bin, returned per group
      (typically ~1e-6 OD; never more than half a coarse bin, span / (2 N_CONC_BINS)).
    * Covariance sums: per-block partials summed exactly on the host (``math.fsum``), so a fit
      does not depend on block scheduling or on the other tiles of the launch.

References
    M. Macenko et al., ISBI 2009, 1107-1110.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _launch
from ._launch import to_host
from ._macenko_kernels import (  # kernels, the constants they are built around, host helpers
    _N_STATS, _PAIRS, _PX_PER_THREAD_STATS, _PX_PER_THREAD_HIST, _od_stats_kernel,
    _angle_histogram_kernel, _concentration_histogram_kernel, _apply_kernel, od_lut, group_pixels,
    _use_kernels, _active, _order_stat_bins, _ranks, _percentile_from_hist, _check_shared_bins, od_lut_on
)

__all__ = [
    "N_ANGLE_BINS",
    "N_CONC_BINS",
    "ANGLE_BOUND_RAD",
    "ConcWindow",
    "od_lut",
    "group_pixels",
    "od_stats",
    "od_stats_ref",
    "angle_histogram",
    "angle_histogram_ref",
    "angle_percentiles",
    "concentration_histogram",
    "concentration_histogram_ref",
    "concentrations_max",
    "concentrations_max_ref",
    "apply",
    "apply_ref",
    "apply_cpu",
    "FIT_OK",
    "FIT_TOO_FEW",
    "FIT_NOT_SEPARABLE",
    "FIT_SPARSE",
    "GroupFits",
    "fit_groups",
    "apply_groups",
    "bench_cases",
]

N_ANGLE_BINS = 8192  # over [-pi, pi): bin 7.67e-4 rad; 32 KiB of shared uint32 per block
N_CONC_BINS = 4096  # per stain and pass (+1 "below the window" bin): 2 x 4097 uint32 = 32 KiB
ANGLE_LO_RAD = -math.pi
ANGLE_BOUND_RAD = math.pi / N_ANGLE_BINS  # half a bin: |angle error| of each stain vector
_MAX_GRID_Y = 65535  # CUDA's gridDim.y limit: more groups are launched in chunks
_MAX_CONC_Q = 99.0


def _run(kernel: Any, px: Any, px_per_thread: int, shared: tuple, grouped: tuple) -> int:
    """Launch ``kernel(px, *shared, *grouped)`` on a (blocks, G) grid; returns blocks.

    ``grouped`` arrays have G rows and are sliced with ``px`` when G exceeds gridDim.y.
    Indices: Numba's ``cuda.grid(1)`` and array indexing are int64 (intp), so inputs with
    nbytes >= 2**31 need no separate index type.
    """
    n_groups, n_px = px.shape[0], px.shape[1]
    blocks, threads = _launch.grid_1d(max(1, -(-n_px // px_per_thread)))
    assert threads <= _launch.THREADS_PER_BLOCK and threads & (threads - 1) == 0  # tree reduction
    stream = _launch.current_stream(px)
    for g0 in range(0, n_groups, _MAX_GRID_Y):
        g1 = min(g0 + _MAX_GRID_Y, n_groups)
        args = (px[g0:g1], *shared, *(a[g0:g1] for a in grouped))
        kernel[(blocks, g1 - g0), threads, stream](*_launch.kernel_args(stream, args))
    return blocks


# --------------------------------------------------------------------------- od_stats


def od_stats(px: Any, *, io: float = 240.0, beta: float = 0.15) -> np.ndarray:
    """Tissue count, OD sums and second moments per group.

    Parameters
    ----------
    px : (G, P, 3) uint8, CuPy or NumPy (see :func:`group_pixels`)
    io, beta : float
        As in :func:`gpupath.stain.fit_macenko`.

    Returns
    -------
    stats : (G, 10) float64 host ndarray
        count, sum of OD r, g, b, sums of rr, rg, rb, gg, gb, bb over tissue pixels.

    Notes
    -----
    The kernel writes one row per block (tree-reduced in shared memory); the rows come to the
    host (G x blocks x 80 bytes) and are summed exactly (``math.fsum``), so the result does
    not depend on block order.
    """
    if not _use_kernels(px):
        return od_stats_ref(px, io=io, beta=beta)
    xp = _launch.device_array_module(px)
    lut = od_lut_on(xp, io, np.float64)
    blocks, _ = _launch.grid_1d(max(1, -(-px.shape[1] // _PX_PER_THREAD_STATS)))
    partial = xp.zeros((px.shape[0], blocks, _N_STATS), np.float64)
    launched = _run(_od_stats_kernel(), px, _PX_PER_THREAD_STATS, (lut, float(beta)), (partial,))
    assert launched == blocks
    part = to_host(partial)  # host: per-block partials, summed exactly (order-free)
    rows = np.ascontiguousarray(part.transpose(0, 2, 1)).reshape(-1, blocks)  # (G * 10, blocks)
    return np.fromiter((math.fsum(r) for r in rows), np.float64, rows.shape[0]).reshape(-1, _N_STATS)


def od_stats_ref(px: ArrayLike, *, io: float = 240.0, beta: float = 0.15) -> np.ndarray:
    """NumPy twin of :func:`od_stats` (host)."""
    od = od_lut(io, np.float64)[to_host(px)]  # (G, P, 3)
    out = np.zeros((od.shape[0], _N_STATS))
    for g in range(od.shape[0]):
        t = od[g][(od[g] >= beta).all(axis=1)]
        out[g, 0] = t.shape[0]
        out[g, 1:4] = t.sum(axis=0)
        out[g, 4:] = [(t[:, a] * t[:, b]).sum() for a, b in _PAIRS]
    return out


def _planes(stats: np.ndarray) -> np.ndarray:
    """(G, 3, 2) principal and second eigenvector of each group's tissue-OD covariance (host).

    Same sign rules as gpupath.stain. Covariance from raw moments: (S2 - s s^T / n) / (n - 1),
    equal to the centred form of the NumPy path to ~1e-15 relative for OD of order 1.
    """
    n = np.maximum(stats[:, 0], 2.0)[:, None, None]
    s = stats[:, 1:4]
    s2 = np.empty((stats.shape[0], 3, 3))
    for k, (a, b) in enumerate(_PAIRS):
        s2[:, a, b] = s2[:, b, a] = stats[:, 4 + k]
    cov = (s2 - s[:, :, None] * s[:, None, :] / n) / (n - 1)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    e1, e2 = vecs[:, :, 2], vecs[:, :, 1]
    e1 = np.where((e1.sum(axis=1) < 0)[:, None], -e1, e1)
    lead = np.take_along_axis(e2, np.abs(e2).argmax(axis=1)[:, None], axis=1)
    e2 = np.where(lead < 0, -e2, e2)
    return np.stack([e1, e2], axis=2)


# --------------------------------------------------------------------------- angle histogram


def angle_histogram(
    px: Any, plane: np.ndarray, *, io: float = 240.0, beta: float = 0.15,
    active: ArrayLike | None = None, n_bins: int = N_ANGLE_BINS,
) -> Any:
    """Histogram of the stain-plane angle phi = atan2(od . e2, od . e1) of tissue pixels.

    Parameters
    ----------
    px : (G, P, 3) uint8, CuPy or NumPy
    plane : (G, 3, 2) float64 host array
        Columns e1, e2 (unit vectors) per group.
    active : (G,) bool, optional
        Groups to bin; others get zero rows.
    n_bins : int
        Bins over [-pi, pi), width 2 pi / n_bins rad.

    Returns
    -------
    hist : (G, n_bins) int64 on px's module
    """
    if not _use_kernels(px):
        return angle_histogram_ref(px, plane, io=io, beta=beta, active=active, n_bins=n_bins)
    xp = _launch.device_array_module(px)
    _check_shared_bins(n_bins, 4, "angle_histogram")
    hist = xp.zeros((px.shape[0], n_bins), np.int64)
    shared = (od_lut_on(xp, io, np.float64), float(beta), ANGLE_LO_RAD, n_bins / (2 * math.pi))
    grouped = (xp.asarray(np.ascontiguousarray(plane, np.float64)), xp.asarray(_active(active, px.shape[0])), hist)
    _run(_angle_histogram_kernel(n_bins), px, _PX_PER_THREAD_HIST, shared, grouped)
    return hist


def angle_histogram_ref(
    px: ArrayLike, plane: np.ndarray, *, io: float = 240.0, beta: float = 0.15,
    active: ArrayLike | None = None, n_bins: int = N_ANGLE_BINS,
) -> np.ndarray:
    """NumPy twin of :func:`angle_histogram` (host)."""
    od = od_lut(io, np.float64)[to_host(px)]
    act = _active(active, od.shape[0])
    hist = np.zeros((od.shape[0], n_bins), np.int64)
    for g in np.flatnonzero(act):
        t = od[g][(od[g] >= beta).all(axis=1)]
        e1, e2 = plane[g, :, 0], plane[g, :, 1]
        phi = np.arctan2(t[:, 0] * e2[0] + t[:, 1] * e2[1] + t[:, 2] * e2[2],
                         t[:, 0] * e1[0] + t[:, 1] * e1[1] + t[:, 2] * e1[2])
        k = np.clip(np.floor((phi - ANGLE_LO_RAD) * (n_bins / (2 * math.pi))), 0, n_bins - 1)
        hist[g] = np.bincount(k.astype(np.int64), minlength=n_bins)
    return hist


def angle_percentiles(hist: Any, n_tissue: np.ndarray, alpha: float) -> np.ndarray:
    """(G, 2) host angles (rad) at the alpha and 100 - alpha percentiles, within half a bin."""
    n_bins = hist.shape[-1]
    width = np.full(hist.shape[0], 2 * math.pi / n_bins)
    lo = np.full(hist.shape[0], ANGLE_LO_RAD)
    return np.stack([_percentile_from_hist(hist, n_tissue, q, lo, width) for q in (alpha, 100.0 - alpha)], axis=1)


# --------------------------------------------------------------------------- concentrations


@dataclass(frozen=True, slots=True)
class ConcWindow:
    """Bins of a concentration histogram pass; all arrays (G, 2) host, per group and stain.

    Pass-1 bin k1 = clip(floor((x - lo1) * inv_w1), 0, n_bins - 1). Values with k1 < bin_lo
    count in the "below" bin; values with bin_lo <= k1 <= bin_hi go to refined bin
    clip(floor((x - lo2) * inv_w2), 0, n_bins - 1); larger values are not counted.
    """

    lo1: np.ndarray
    inv_w1: np.ndarray
    bin_lo: np.ndarray  # int64, inclusive
    bin_hi: np.ndarray  # int64, inclusive
    lo2: np.ndarray
    inv_w2: np.ndarray
    n_bins: int


def concentration_histogram(
    px: Any, pinv: np.ndarray, window: ConcWindow, *, io: float = 240.0, active: ArrayLike | None = None
) -> Any:
    """(G, 2, n_bins + 1) int64 on px's module: [..., 0] below the window, [..., 1:] the window.

    ``pinv`` (G, 2, 3) float64 host: least-squares operator of each group's stain matrix;
    concentrations of all pixels (tissue or not, as in the reference) are binned.
    """
    if not _use_kernels(px):
        return concentration_histogram_ref(px, pinv, window, io=io, active=active)
    xp = _launch.device_array_module(px)
    _check_shared_bins(window.n_bins + 1, 8, "concentration_histogram")
    hist = xp.zeros((px.shape[0], 2, window.n_bins + 1), np.int64)
    f8 = lambda a: xp.asarray(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
    i8 = lambda a: xp.asarray(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    w = window
    grouped = (f8(pinv), xp.asarray(_active(active, px.shape[0])), f8(w.lo1), f8(w.inv_w1),
               i8(w.bin_lo), i8(w.bin_hi), f8(w.lo2), f8(w.inv_w2), hist)
    _run(_concentration_histogram_kernel(w.n_bins), px, _PX_PER_THREAD_HIST,
         (od_lut_on(xp, io, np.float64),), grouped)
    return hist


def concentration_histogram_ref(
    px: ArrayLike, pinv: np.ndarray, window: ConcWindow, *, io: float = 240.0, active: ArrayLike | None = None
) -> np.ndarray:
    """NumPy twin of :func:`concentration_histogram` (host)."""
    od = od_lut(io, np.float64)[to_host(px)]
    w, nb = window, window.n_bins
    hist = np.zeros((od.shape[0], 2, nb + 1), np.int64)
    for g in np.flatnonzero(_active(active, od.shape[0])):
        for j in range(2):
            p = pinv[g, j]
            x = od[g, :, 0] * p[0] + od[g, :, 1] * p[1] + od[g, :, 2] * p[2]
            k1 = np.clip(np.floor((x - w.lo1[g, j]) * w.inv_w1[g, j]), 0, nb - 1)
            inside = (k1 >= w.bin_lo[g, j]) & (k1 <= w.bin_hi[g, j])
            k2 = np.clip(np.floor((x[inside] - w.lo2[g, j]) * w.inv_w2[g, j]), 0, nb - 1).astype(np.int64)
            hist[g, j, 0] = int((k1 < w.bin_lo[g, j]).sum())
            hist[g, j, 1:] = np.bincount(k2, minlength=nb)
    return hist


def _pinv(stain_matrix_od: np.ndarray) -> np.ndarray:
    """(G, 2, 3) least-squares operators (M^T M)^-1 M^T of (G, 3, 2) stain matrices, as gpupath.stain."""
    mt = np.swapaxes(stain_matrix_od, 1, 2)
    return np.linalg.solve(mt @ stain_matrix_od, mt)


def concentrations_max(
    px: Any, pinv: np.ndarray, *, io: float = 240.0, active: ArrayLike | None = None,
    q: float = _MAX_CONC_Q, n_bins: int = N_CONC_BINS,
) -> tuple[np.ndarray, np.ndarray]:
    """q-th percentile of each group's H and E concentrations over all its pixels.

    Parameters
    ----------
    px : (G, P, 3) uint8, CuPy or NumPy
    pinv : (G, 2, 3) float64 host
        Least-squares operator of each group's stain matrix.
    active : (G,) bool, optional
    q : float
        Percentile, 0..100.
    n_bins : int
        Bins per pass and stain.

    Returns
    -------
    max_conc, bound : (G, 2) float64 host arrays
        The percentile and a bound on its distance from np.percentile(..., q) (linear
        interpolation) of the same concentrations. Inactive groups: unspecified values.

    Notes
    -----
    Pass 1 bins over the range that OD in [od_lut.min(), od_lut.max()] allows under ``pinv``
    (no data-dependent min/max pass); pass 2 re-bins only the pass-1 bins from the one holding
    order statistic k0 to the one holding k1 = k0 + 1, ``n_bins`` refined bins over them.
    Both order statistics are taken at refined bin midpoints: bound = half a refined bin.
    """
    return _concentrations_max(px, pinv, io, active, q, n_bins, _use_kernels(px))


def _concentrations_max(
    px: Any, pinv: np.ndarray, io: float, active: ArrayLike | None, q: float, n_bins: int, kern: bool
) -> tuple[np.ndarray, np.ndarray]:
    n_groups, n_px = px.shape[0], px.shape[1]
    hist_fn = concentration_histogram if kern else concentration_histogram_ref
    lut = od_lut(io, np.float64)
    lo1 = np.minimum(pinv * lut.min(), pinv * lut.max()).sum(axis=2)  # (G, 2)
    hi1 = np.maximum(pinv * lut.min(), pinv * lut.max()).sum(axis=2)
    w1 = np.maximum(hi1 - lo1, 1e-12) / n_bins  # inactive groups (pinv 0): any positive width
    inv_w1 = 1.0 / w1
    k0, k1, frac = _ranks(np.array(n_px), q)
    ranks = np.broadcast_to(np.array([k0, k1]), (n_groups, 2, 2))
    full = ConcWindow(lo1, inv_w1, np.zeros((n_groups, 2), np.int64), np.full((n_groups, 2), n_bins - 1),
                      lo1, inv_w1, n_bins)
    bins = _order_stat_bins(hist_fn(px, pinv, full, io=io, active=active)[..., 1:], ranks)  # (G, 2, 2)
    lo2 = lo1 + bins[..., 0] * w1
    w2 = (bins[..., 1] - bins[..., 0] + 1) * w1 / n_bins
    fine = ConcWindow(lo1, inv_w1, bins[..., 0], bins[..., 1], lo2, 1.0 / w2, n_bins)
    hist2 = hist_fn(px, pinv, fine, io=io, active=active)
    below = to_host(hist2[..., 0])  # host: (G, 2) counts below the window
    bins2 = _order_stat_bins(hist2[..., 1:], ranks - below[..., None])
    mid = lo2[..., None] + (bins2 + 0.5) * w2[..., None]
    return mid[..., 0] + frac * (mid[..., 1] - mid[..., 0]), w2 / 2


def concentrations_max_ref(px: ArrayLike, pinv: np.ndarray, *, io: float = 240.0, q: float = _MAX_CONC_Q) -> np.ndarray:
    """Exact twin of :func:`concentrations_max`: np.percentile of the concentrations, (G, 2)."""
    od = od_lut(io, np.float64)[to_host(px)]
    return np.stack([np.percentile(od[g] @ pinv[g].T, q, axis=0) for g in range(od.shape[0])])


# --------------------------------------------------------------------------- apply


def _apply_params(
    pinv: np.ndarray, scale: np.ndarray, target_matrix: np.ndarray, io_in: float, io_out: float
) -> tuple[np.ndarray, ...]:
    """float32 parameters, cast from float64 exactly as gpupath.stain.apply_macenko casts them."""
    f4 = np.float32
    return (od_lut(io_in, f4), np.ascontiguousarray(target_matrix, f4), f4(io_out),
            np.ascontiguousarray(pinv, f4), np.ascontiguousarray(scale, f4))


def apply(
    px: Any, pinv: np.ndarray, scale: np.ndarray, target_matrix: np.ndarray, *,
    io_in: float, io_out: float, active: ArrayLike | None = None,
) -> Any:
    """Re-render pixels: (G, P, 3) uint8 on px's module.

    Per group g, in float32: C = pinv[g] od (od at ``io_in``), C *= scale[g], out =
    rint(io_out * exp(-target_matrix C) - 1) clipped to [0, 255]. Inactive groups are copied.
    ``pinv`` (G, 2, 3), ``scale`` (G, 2) (target / source max_conc), ``target_matrix`` (3, 2),
    all float64 host.
    """
    if not _use_kernels(px):
        return apply_ref(px, pinv, scale, target_matrix, io_in=io_in, io_out=io_out, active=active)
    xp = _launch.device_array_module(px)
    _, mt, io32, pinv32, scale32 = _apply_params(pinv, scale, target_matrix, io_in, io_out)
    out = xp.empty_like(px)
    grouped = (xp.asarray(pinv32), xp.asarray(scale32), xp.asarray(_active(active, px.shape[0])), out)
    _run(_apply_kernel(), px, 1, (od_lut_on(xp, io_in, np.float32), xp.asarray(mt), io32), grouped)
    return out


def apply_ref(
    px: ArrayLike, pinv: np.ndarray, scale: np.ndarray, target_matrix: np.ndarray, *,
    io_in: float, io_out: float, active: ArrayLike | None = None,
) -> np.ndarray:
    """NumPy twin of :func:`apply` (host), float32 throughout."""
    px = to_host(px)
    lut, mt, io32, pinv32, scale32 = _apply_params(pinv, scale, target_matrix, io_in, io_out)
    out = px.copy()
    for g in np.flatnonzero(_active(active, px.shape[0])):
        od = lut[px[g]]
        r, gr, b = od[:, 0], od[:, 1], od[:, 2]
        p, s = pinv32[g], scale32[g]
        c0 = (p[0, 0] * r + p[0, 1] * gr + p[0, 2] * b) * s[0]
        c1 = (p[1, 0] * r + p[1, 1] * gr + p[1, 2] * b) * s[1]
        for c in range(3):
            y = io32 * np.exp(-(c0 * mt[c, 0] + c1 * mt[c, 1])) - np.float32(1)
            out[g, :, c] = np.clip(np.rint(y), 0, 255)
    return out


_SAFE_EXPONENT = 230.0  # |exponent| of every table entry below this: products of three stay in [1e-300, 1e300]


def _channel_tables(lut: np.ndarray, mt: np.ndarray, pinv: np.ndarray, scale: np.ndarray,
                    io_out: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(factors, exponents, safe)`` per group g, output channel c, input channel k and grey level v:
    ``exponents[g, c, k, v] = W[g, c, k] * lut[v]`` with ``W[g, c, k] = sum_j mt[c, j] scale[g, j] pinv[g, j, k]``,
    ``factors = exp(-exponents)`` with io_out folded into k = 0, float64; ``safe[g]``: every exponent of the
    group is within +-_SAFE_EXPONENT, so no product of three factors over- or underflows.

    The output channel c of a pixel (r, g, b) is ``io_out * exp(-sum_k W[c, k] od_k) - 1`` (apply_ref's
    expression regrouped) = ``factors[c, 0][r] * factors[c, 1][g] * factors[c, 2][b] - 1``: 9 lookups and 6
    products a pixel instead of 3 ``exp``. Groups that are not safe (concentrations scaled by absurd
    factors) take ``exp`` of the sum of the exponents instead, which neither overflows nor loses a term.
    """
    w = np.einsum("cj,gj,gjk->gck", mt.astype(np.float64), scale.astype(np.float64), pinv.astype(np.float64))
    exponents = np.ascontiguousarray(w[..., None] * lut.astype(np.float64)[None, None, None, :])
    safe = np.abs(exponents).reshape(len(exponents), -1).max(axis=1, initial=0.0) <= _SAFE_EXPONENT
    with np.errstate(over="ignore"):  # unsafe groups' factors are never read
        factors = np.exp(-np.where(safe[:, None, None, None], exponents, 0.0))
    factors[:, :, 0, :] *= float(io_out)
    return np.ascontiguousarray(factors), exponents, safe


@functools.cache
def _apply_cpu_kernel() -> Any:
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def apply_cpu(px, factors, exponents, safe, io_out, active, out):
        n_groups, n_px, _ = px.shape
        for k in numba.prange(n_groups * n_px):
            g, i = k // n_px, k % n_px
            r, gr, b = px[g, i, 0], px[g, i, 1], px[g, i, 2]
            if not active[g]:
                out[g, i, 0], out[g, i, 1], out[g, i, 2] = r, gr, b
                continue
            for c in range(3):
                if safe[g]:
                    y = factors[g, c, 0, r] * factors[g, c, 1, gr] * factors[g, c, 2, b] - 1.0
                else:
                    y = io_out * np.exp(-(exponents[g, c, 0, r] + exponents[g, c, 1, gr] + exponents[g, c, 2, b])) - 1.0
                y = np.rint(y)
                out[g, i, c] = 0 if y < 0 else (255 if y > 255 else np.uint8(y))  # +inf -> 255
        return out

    return apply_cpu


def apply_cpu(
    px: np.ndarray, pinv: np.ndarray, scale: np.ndarray, target_matrix: np.ndarray, *,
    io_in: float, io_out: float, active: ArrayLike | None = None,
) -> np.ndarray:
    """:func:`apply` compiled for the CPU (Numba, all cores, one pass per pixel): host (G, P, 3)
    uint8 in and out; :func:`apply_ref`'s result within 1 grey level.

    The exponential of a sum is the product of exponentials: each group's 9 (output channel, input
    channel) factors are 256-entry tables (:func:`_channel_tables`, float64), so a pixel costs 9
    lookups and 6 products, no ``exp`` (a group whose exponents could over- or underflow a product
    takes one ``exp`` of their sum). Differs from the float32 twin only where its value lies within
    float32 rounding of a half grey level (tested: <= 1 level, at <= 1e-3 of the pixels).
    """
    px = np.asarray(px)
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[-1] != 3:
        raise ValueError(f"px: expected (G, P, 3) uint8, got {px.dtype} {px.shape}")
    lut, mt, io32, pinv32, scale32 = _apply_params(pinv, scale, target_matrix, io_in, io_out)
    active = _active(active, px.shape[0])
    factors, exponents, safe = _channel_tables(lut, mt, pinv32, scale32, io32)
    out = np.empty_like(px)
    return _apply_cpu_kernel()(np.ascontiguousarray(px), factors, exponents, safe, float(io32), active, out)


# --------------------------------------------------------------------------- fits and re-rendering of pixel groups

FIT_OK, FIT_TOO_FEW, FIT_NOT_SEPARABLE, FIT_SPARSE = 0, 1, 2, 3
"""Status of one group's fit: fitted, or the first test it failed (the stain stage words each)."""


@dataclass(frozen=True, slots=True)
class GroupFits:
    """Macenko fits of G pixel groups, as arrays (``gpupath.stain`` turns them into ``StainFit``s).

    ``status`` (G,) int8: :data:`FIT_OK` or the test that failed; ``n_tissue`` (G,) tissue pixels;
    ``phi`` (G, 2) the alpha / 100 - alpha stain-plane angles (NaN where not reached); ``stains``
    (G, 3, 2) H and E OD vectors and ``max_conc`` (G, 2) their robust maxima (valid where FIT_OK).
    """

    status: np.ndarray
    n_tissue: np.ndarray
    phi: np.ndarray
    stains: np.ndarray
    max_conc: np.ndarray


def fit_groups(
    px: Any, *, io: float, beta: float, alpha: float, need_px: int, min_angle_spread_rad: float,
    min_max_conc: float, use_kernels: bool | None = None,
) -> GroupFits:
    """Fit every group of ``(G, P, 3)`` uint8 ``px`` (one launch per pass for all groups).

    A group needs ``need_px`` tissue pixels (OD >= ``beta`` in all channels), extreme angles at
    least ``min_angle_spread_rad`` apart and both robust maxima above ``min_max_conc``; later
    passes skip groups that failed. ``use_kernels=False`` runs the NumPy twins (tests at full size).
    """
    kern = _use_kernels(px) if use_kernels is None else use_kernels
    n_groups = px.shape[0]
    stats = (od_stats if kern else od_stats_ref)(px, io=io, beta=beta)
    n_tissue = stats[:, 0].astype(np.int64)
    status = np.where(n_tissue >= need_px, FIT_OK, FIT_TOO_FEW).astype(np.int8)
    phi = np.full((n_groups, 2), np.nan)
    stains = np.zeros((n_groups, 3, 2))
    max_conc = np.zeros((n_groups, 2))
    active = status == FIT_OK
    if active.any():
        plane = _planes(stats)
        hist = (angle_histogram if kern else angle_histogram_ref)(px, plane, io=io, beta=beta, active=active)
        phi[active] = angle_percentiles(hist, n_tissue, alpha)[active]  # (G, 2): alpha, 100 - alpha
        status[active & (phi[:, 1] - phi[:, 0] < min_angle_spread_rad)] = FIT_NOT_SEPARABLE
        active = status == FIT_OK
    if active.any():
        v = plane @ np.stack([np.cos(np.nan_to_num(phi)), np.sin(np.nan_to_num(phi))], axis=1)  # v_lo, v_hi
        h_is_lo = v[:, 0, 0] > v[:, 0, 1]  # hematoxylin: larger red OD (ties: v_hi)
        stains[active] = np.where(h_is_lo[:, None, None], v, v[:, :, ::-1])[active]
        pinv = np.zeros((n_groups, 2, 3))
        pinv[active] = _pinv(stains[active])
        conc, _ = _concentrations_max(px, pinv, io, active, _MAX_CONC_Q, N_CONC_BINS, kern)
        max_conc[active] = conc[active]
        status[active & ~(max_conc > min_max_conc).all(axis=1)] = FIT_SPARSE
    return GroupFits(status=status, n_tissue=n_tissue, phi=phi, stains=stains, max_conc=max_conc)


def apply_groups(
    px: Any, stains: np.ndarray, max_conc: np.ndarray, target_matrix: np.ndarray, target_max_conc: np.ndarray, *,
    io_in: float, io_out: float, active: ArrayLike, on_host: bool = False,
) -> Any:
    """Re-render each active group of ``(G, P, 3)`` ``px`` from its stains (G, 3, 2) and maxima (G, 2)
    with the target's; inactive groups are copied unchanged. One fused launch (``on_host``: one pass
    of the compiled CPU kernel, :func:`apply_cpu`, on host ``px``)."""
    active = np.asarray(active, dtype=bool)
    if not active.any():
        return px.copy()
    pinv = np.zeros((px.shape[0], 2, 3))
    scale = np.zeros((px.shape[0], 2))
    pinv[active] = _pinv(np.asarray(stains)[active])
    scale[active] = np.asarray(target_max_conc)[None] / np.asarray(max_conc)[active]
    run = apply_cpu if on_host else apply
    return run(px, pinv, scale, target_matrix, io_in=io_in, io_out=io_out, active=active)


# --------------------------------------------------------------------------- bench


_BENCH_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])  # Macenko's H&E reference


def _bench_pixels(rng: np.random.Generator, n_px: int) -> tuple[np.ndarray]:
    """(1, n_px, 3) uint8 H&E-like pixels (Beer-Lambert under the reference stains)."""
    conc = rng.uniform(0.0, 1.5, (n_px, 2)) * (rng.random((n_px, 1)) > 0.2)  # ~20 % background
    od = conc @ _BENCH_STAINS.T
    return (np.clip(np.rint(240.0 * np.exp(-od) - 1), 0, 255).astype(np.uint8)[None],)


def _bench_apply_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _pinv(_BENCH_STAINS[None]), np.full((1, 2), 1 / 1.1), _BENCH_STAINS


def bench_cases() -> list[_launch.BenchCase]:
    """od_stats and apply for bench/bench_kernels.py; bytes_moved = bytes read + written."""
    pinv, scale, mt = _bench_apply_params()
    return [
        _launch.BenchCase(
            name="macenko_od_stats",
            make_input=_bench_pixels,
            run=od_stats,
            run_twin=od_stats_ref,
            bytes_moved=lambda args: args[0].nbytes,  # + G x blocks x 80 B of partials, negligible
        ),
        _launch.BenchCase(
            name="macenko_apply",
            make_input=_bench_pixels,
            run=lambda px: apply(px, pinv, scale, mt, io_in=240.0, io_out=240.0),
            run_twin=lambda px: apply_ref(px, pinv, scale, mt, io_in=240.0, io_out=240.0),
            bytes_moved=lambda args: 2 * args[0].nbytes,
        ),
    ]
