"""Classic nuclei detector on the device: hematoxylin, multi-scale LoG response, peak mask.

What it does
    The per-pixel stages of :func:`gpupath.detect.classic.detect_nuclei` as Numba CUDA kernels:

    1. :func:`hematoxylin`: ``(N, H, W, 3)`` uint8 RGB -> ``(N, H, W)`` float32 hematoxylin
       concentration, one fused elementwise pass: optical density ``OD = ln(io / (I + 1))`` (the
       formula of :func:`gpupath.stain.od_from_rgb`) then the dot product with the hematoxylin row
       of the colour-deconvolution matrix (computed on the host, 3 numbers).
    2. :func:`best_log_response`: scale-normalised Laplacian of Gaussian
       ``-s^2 (d2/dr2 + d2/dc2) G_s * h`` at each scale, as two separable passes (along rows, then
       along columns, ``nearest`` boundary = ``scipy.ndimage`` ``mode="nearest"``), keeping the
       maximum over scales and the index of the scale that gave it.
    3. :func:`peak_mask`: local maxima over a ``(1, w, w)`` window (``nearest`` boundary), above a
       threshold, not on the tile's one-pixel border.

In and out
    Tiles are ``(N, H, W, 3)`` uint8 (any strides); maps are ``(N, H, W)`` on the input's device,
    tile px, row ``r`` down, column ``c`` right. Sigmas are in tile px. Nothing is smoothed across
    the batch axis.

Device
    CuPy input: the kernels, on CuPy's current stream. NumPy input: the kernels under Numba's CUDA
    simulator when it is on (CI), else the NumPy/SciPy twins (``*_ref``).

Precision (where the kernels differ from the twins)
    Filter taps are computed on the host in float64 exactly as ``scipy.ndimage`` computes them
    (radius ``int(truncate * sigma + 0.5)``, sampled Gaussian normalised to sum 1, derivative
    weights from the same normalised samples), then rounded to float32; the kernels accumulate in
    float32 where SciPy accumulates in float64 (both round the intermediate image to float32). The
    twins' responses are float64 (as the host detector's), the kernels' float32. Measured under the
    simulator on the tests' images: response error <= 3.6e-7 for |response| <= 2.3, hematoxylin
    error <= 4.8e-7; a GPU adds FMA contraction and a <= 1 ulp ``logf``. Tests assert atol 1e-5
    on both.

References
    A. C. Ruifrok, D. A. Johnston, "Quantification of histochemical staining by color
    deconvolution", Anal. Quant. Cytol. Histol. 23 (2001). T. Lindeberg, "Feature detection with
    automatic scale selection", IJCV 30 (1998).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _launch

# ``numba.cuda``, bound on the first kernel build (not at import). Kernels must reach it through a
# module global: the CUDA simulator swaps globals that are the cuda module for its per-block fake.
cuda: Any = None

__all__ = [
    "gaussian_taps",
    "hematoxylin",
    "hematoxylin_ref",
    "log_response",
    "log_response_ref",
    "best_log_response",
    "best_log_response_ref",
    "peak_mask",
    "peak_mask_ref",
    "bench_cases",
]

MAX_SCALES = 127  # best_scale is int8


# --------------------------------------------------------------------------- host: filter taps
def gaussian_taps(sigma: float, order: int, *, truncate: float = 4.0) -> np.ndarray:
    """Correlation weights of a sampled Gaussian derivative, as ``scipy.ndimage.gaussian_filter1d`` uses.

    Parameters
    ----------
    sigma : standard deviation, px (> 0).
    order : derivative order (0 = smoothing, 2 = second derivative).
    truncate : radius in standard deviations: ``radius = int(truncate * sigma + 0.5)`` px.

    Returns
    -------
    (2 * radius + 1,) float64; weight ``k`` multiplies the sample at offset ``k - radius``.

    Notes
    -----
    With ``phi(x) = exp(-x^2 / (2 sigma^2)) / sum_x exp(-x^2 / (2 sigma^2))`` over the integer
    offsets ``|x| <= radius``, the n-th derivative of the Gaussian is
    ``(-1/sigma)^n He_n(x/sigma) phi(x)`` (He_n: probabilists' Hermite polynomials,
    ``He_0 = 1, He_1 = u, He_{n+1} = u He_n - n He_{n-1}``). Filtering is a convolution with it;
    as a correlation the weight at offset ``x`` is its value at ``-x``, i.e.
    ``sigma^-n He_n(x/sigma) phi(x)``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive px, got {sigma}")
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (x / sigma) ** 2)
    phi /= phi.sum()
    u = x / sigma
    he_prev, he = np.zeros_like(u), np.ones_like(u)  # He_{-1} (unused), He_0
    for n in range(order):
        he_prev, he = he, u * he - n * he_prev
    return he * phi / float(sigma) ** order


# --------------------------------------------------------------------------- kernel factories
@functools.cache
def _device_functions(idx64: bool) -> tuple[Any, Any, Any]:
    """(index type, unravel, clamp): the device functions every kernel here calls; ``idx64``: 64-bit indices."""
    import numba

    global cuda  # noqa: PLW0603  (see the comment at the top of the module)
    cuda = _launch.cuda()
    idx_t = numba.int64 if idx64 else numba.int32

    @cuda.jit(device=True)
    def unravel(i, plane, width):
        # flat index over (N, H, W) -> (tile, row, col)
        t = idx_t(i // plane)
        rem = idx_t(i - t * plane)
        r = idx_t(rem // width)
        return t, r, idx_t(rem - r * width)

    @cuda.jit(device=True)
    def clamp(k, n):
        # k clipped to [0, n - 1] (mode "nearest"); no builtin min/max: Numba's CUDA target fails
        # to type their overloads on scalars
        if k < 0:
            return idx_t(0)
        if k > n - 1:
            return idx_t(n - 1)
        return idx_t(k)

    return idx_t, unravel, clamp


@functools.cache
def _hema_kernel(idx64: bool) -> Any:
    idx_t, unravel, _ = _device_functions(idx64)

    @cuda.jit
    def hema(rgb, od_lut, h0, h1, h2, out):
        # rgb (N, H, W, 3) uint8; od_lut (256,) float32 = gpupath.stain's OD of each grey level;
        # h0..h2 float32; out (N, H, W) float32
        width = idx_t(rgb.shape[2])
        plane = idx_t(rgb.shape[1] * rgb.shape[2])
        n = idx_t(rgb.shape[0] * plane)
        for i in range(idx_t(cuda.grid(1)), n, idx_t(cuda.gridsize(1))):
            t, r, c = unravel(i, plane, width)
            out[t, r, c] = od_lut[rgb[t, r, c, 0]] * h0 + od_lut[rgb[t, r, c, 1]] * h1 + od_lut[rgb[t, r, c, 2]] * h2

    return hema


@functools.cache
def _log_kernels(idx64: bool) -> tuple[Any, Any]:
    """The separable scale-normalised LoG: the pass along rows, then along columns with the max over scales."""
    import numba

    idx_t, unravel, clamp = _device_functions(idx64)
    f32 = numba.float32

    @cuda.jit
    def along_rows(h, taps0, taps2, out0, out2):
        # h (N, H, W) float32; taps (2R+1,) float32; out0 = G * h, out2 = G'' * h along axis 1
        height = idx_t(h.shape[1])
        width = idx_t(h.shape[2])
        plane = idx_t(height * width)
        n = idx_t(h.shape[0] * plane)
        n_taps = idx_t(taps0.shape[0])
        radius = idx_t((n_taps - 1) // 2)
        for i in range(idx_t(cuda.grid(1)), n, idx_t(cuda.gridsize(1))):
            t, r, c = unravel(i, plane, width)
            acc0 = f32(0.0)
            acc2 = f32(0.0)
            for k in range(n_taps):
                rr = clamp(r + k - radius, height)  # mode="nearest"
                v = h[t, rr, c]
                acc0 += taps0[k] * v
                acc2 += taps2[k] * v
            out0[t, r, c] = acc0
            out2[t, r, c] = acc2

    @cuda.jit
    def along_cols(s0, s2, taps0, taps2, neg_s2, scale, best, best_scale):
        # s0 = G_r * h, s2 = G''_r * h; response = -s^2 (G_c * s2 + G''_c * s0), max over scales
        height = idx_t(s0.shape[1])
        width = idx_t(s0.shape[2])
        plane = idx_t(height * width)
        n = idx_t(s0.shape[0] * plane)
        n_taps = idx_t(taps0.shape[0])
        radius = idx_t((n_taps - 1) // 2)
        for i in range(idx_t(cuda.grid(1)), n, idx_t(cuda.gridsize(1))):
            t, r, c = unravel(i, plane, width)
            d2_rows = f32(0.0)
            d2_cols = f32(0.0)
            for k in range(n_taps):
                cc = clamp(c + k - radius, width)  # mode="nearest"
                d2_rows += taps0[k] * s2[t, r, cc]
                d2_cols += taps2[k] * s0[t, r, cc]
            resp = neg_s2 * (d2_rows + d2_cols)
            if scale == 0 or resp > best[t, r, c]:  # first scale, or strictly better (as the host)
                best[t, r, c] = resp
                best_scale[t, r, c] = scale

    return along_rows, along_cols


@functools.cache
def _peaks_kernel(idx64: bool) -> Any:
    idx_t, unravel, clamp = _device_functions(idx64)

    @cuda.jit
    def peaks(best, half, threshold, out):
        # best (N, H, W) float; out (N, H, W) uint8: 1 where best is the maximum of its
        # (2 half + 1)^2 window (clamped = mode "nearest"), > threshold, off the 1-px border
        height = idx_t(best.shape[1])
        width = idx_t(best.shape[2])
        plane = idx_t(height * width)
        n = idx_t(best.shape[0] * plane)
        for i in range(idx_t(cuda.grid(1)), n, idx_t(cuda.gridsize(1))):
            t, r, c = unravel(i, plane, width)
            flag = 0
            if r >= 1 and r < height - 1 and c >= 1 and c < width - 1:
                v = best[t, r, c]
                if v > threshold:  # in best's precision, as the host's NumPy comparison
                    flag = 1
                    for rr in range(clamp(r - half, height), clamp(r + half, height) + 1):
                        for cc in range(clamp(c - half, width), clamp(c + half, width) + 1):
                            if best[t, rr, cc] > v:
                                flag = 0
                                break
                        if flag == 0:
                            break
            out[t, r, c] = flag

    return peaks


def _kernels(idx64: bool) -> dict[str, Any]:
    """The four kernels, compiled on first launch; ``idx64``: 64-bit pixel indices."""
    along_rows, along_cols = _log_kernels(idx64)
    return {"hema": _hema_kernel(idx64), "along_rows": along_rows, "along_cols": along_cols,
            "peaks": _peaks_kernel(idx64)}


# --------------------------------------------------------------------------- NumPy / SciPy twins
def _od_table(io: float) -> np.ndarray:
    """(256,) float32 OD of every grey level (:func:`_launch.od_table`, the stain stage's own
    expression, so the kernel's OD is the host's, bit for bit)."""
    return np.ascontiguousarray(_launch.od_table(io, np.float32))


@functools.lru_cache(maxsize=16)
def _device_od_table(device: int, io: float) -> Any:
    """:func:`_od_table` uploaded once per device and ``io``."""
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(_od_table(io))


def hematoxylin_ref(tiles: np.ndarray, h_row: ArrayLike, *, io: float = 240.0) -> np.ndarray:
    """NumPy twin of :func:`hematoxylin`: ``od_from_rgb`` then the three multiply-adds of ``hematoxylin_od``."""
    od = np.log(np.float32(io) / (np.asarray(tiles).astype(np.float32) + 1))
    h = np.asarray(h_row, np.float64)
    return od[..., 0] * float(h[0]) + od[..., 1] * float(h[1]) + od[..., 2] * float(h[2])


def log_response_ref(h: np.ndarray, sigma: float) -> np.ndarray:
    """SciPy twin of :func:`log_response`: ``-s^2`` times two float32 second-derivative filters, float64."""
    from scipy import ndimage

    s = float(sigma)
    sig = (0.0, s, s)  # no smoothing across the batch axis
    lap = ndimage.gaussian_filter(h, sig, order=(0, 2, 0), mode="nearest")
    lap += ndimage.gaussian_filter(h, sig, order=(0, 0, 2), mode="nearest")
    return -(s * s) * lap.astype(np.float64)


def best_log_response_ref(h: np.ndarray, sigmas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """SciPy twin of :func:`best_log_response` (the loop of ``detect_nuclei``)."""
    best = best_scale = None
    for i, s in enumerate(sigmas):
        resp = log_response_ref(h, s)
        if best is None:
            best, best_scale = resp, np.zeros(resp.shape, np.int8)
        else:
            better = resp > best
            best = np.where(better, resp, best)
            best_scale = np.where(better, np.int8(i), best_scale)
    return best, best_scale


def peak_mask_ref(best: np.ndarray, *, window_px: int, threshold: float) -> np.ndarray:
    """SciPy twin of :func:`peak_mask`: ``best == maximum_filter(best)``, above threshold, border off."""
    from scipy import ndimage

    peak = (best == ndimage.maximum_filter(best, size=(1, window_px, window_px), mode="nearest")) & (best > threshold)
    peak[:, 0, :] = False
    peak[:, -1, :] = False
    peak[:, :, 0] = False
    peak[:, :, -1] = False
    return peak


# --------------------------------------------------------------------------- public wrappers
def _use_kernel(x: Any) -> bool:
    return _launch.is_device_array(x) or _launch.simulator_enabled()


def _prepare(x: Any, xp: Any) -> Any:
    # the simulator copies host arrays to a fake device and needs them contiguous; CuPy arrays
    # go to the kernel with their strides
    return np.ascontiguousarray(x) if xp is np else x


def hematoxylin(tiles: ArrayLike, h_row: ArrayLike, *, io: float = 240.0) -> Any:
    """Hematoxylin concentration per pixel, one fused pass (OD + colour deconvolution).

    Parameters
    ----------
    tiles : (..., 3) uint8, NumPy or CuPy, any strides. Grey levels 0..255.
    h_row : (3,) row 0 of the inverse of ``[h, e, h x e]`` (see
        ``gpupath.detect.classic._deconvolution_matrix``): OD (R, G, B) -> hematoxylin.
    io : background transmitted intensity, grey levels (0 < io <= 255).

    Returns
    -------
    (...) float32 on the input's device: ``sum_k ln(io / (I_k + 1)) * h_row[k]``.

    Raises
    ------
    TypeError : tiles not uint8.
    ValueError : last axis not 3, ``h_row`` not 3 numbers, ``io`` out of range.

    Notes
    -----
    ``h_row`` is passed as three float32 scalars; OD comes from a 256-entry table of the host's
    own OD values (uploaded once per device), so only fused multiply-adds can differ from the twin.
    """
    if not _launch.is_device_array(tiles):
        tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8:
        raise TypeError(f"tiles must be uint8 RGB, got dtype {tiles.dtype}")
    if tiles.ndim < 1 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be (..., 3), got shape {tuple(tiles.shape)}")
    h = np.asarray(h_row, np.float64)
    if h.shape != (3,):
        raise ValueError(f"h_row must be 3 numbers (OD R, G, B -> hematoxylin), got shape {h.shape}")
    if not 0 < io <= 255:
        raise ValueError(f"io must be in (0, 255] grey levels, got {io}")
    if not _use_kernel(tiles):
        return hematoxylin_ref(np.asarray(tiles), h, io=io)
    xp = _launch.device_array_module(tiles)
    lead = tuple(tiles.shape[:-1])
    if tiles.ndim <= 4:
        four = tiles.reshape((1,) * (4 - tiles.ndim) + tuple(tiles.shape))  # leading axes: a view
    else:
        four = tiles.reshape((-1, *tiles.shape[-3:]))
    four = _prepare(four, xp)
    out = xp.empty(four.shape[:-1], xp.float32)
    if out.size:
        idx64 = four.nbytes >= 2**31
        f = np.float32
        lut = _od_table(io) if xp is np else _device_od_table(xp.cuda.Device().id, float(io))
        _launch.launch_1d(_kernels(idx64)["hema"], out.size, four, lut, f(h[0]), f(h[1]), f(h[2]), out)
    return out.reshape(lead)


def _check_maps(x: Any, name: str) -> Any:
    x = x if _launch.is_device_array(x) else np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {tuple(x.shape)}")
    return x


@functools.lru_cache(maxsize=64)
def _device_taps(sigma: float, truncate: float, device_id: int) -> tuple[Any, Any]:
    """Float32 order-0 and order-2 taps on GPU ``device_id``, uploaded once per sigma (not per batch)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return (cupy.asarray(gaussian_taps(sigma, 0, truncate=truncate), cupy.float32),
                cupy.asarray(gaussian_taps(sigma, 2, truncate=truncate), cupy.float32))


def _taps(sigma: float, truncate: float, xp: Any) -> tuple[Any, Any]:
    if xp is np:
        return (gaussian_taps(sigma, 0, truncate=truncate).astype(np.float32),
                gaussian_taps(sigma, 2, truncate=truncate).astype(np.float32))
    return _device_taps(sigma, truncate, xp.cuda.Device().id)


def best_log_response(h: ArrayLike, sigmas: Sequence[float], *, truncate: float = 4.0) -> tuple[Any, Any]:
    """Maximum over scales of the scale-normalised LoG response, and the scale that gave it.

    Parameters
    ----------
    h : (N, H, W) float32, NumPy or CuPy, any strides (hematoxylin OD per tile px).
    sigmas : Gaussian standard deviations, tile px (> 0), at most 127.
    truncate : filter radius in standard deviations (``int(truncate * s + 0.5)`` px), as SciPy.

    Returns
    -------
    best : (N, H, W) float32, ``max_s -s^2 (d2/dr2 + d2/dc2)(G_s * h)`` (the batch axis is not
        smoothed; boundary ``nearest``).
    best_scale : (N, H, W) int8, index into ``sigmas`` of the maximum (first on ties).

    Raises
    ------
    TypeError : h not float32.
    ValueError : wrong shape, no sigmas, a sigma not positive or too many sigmas.

    Notes
    -----
    Two separable passes per scale: along rows (both the smoothing and the second-derivative taps
    in one read of ``h``), then along columns, fused with ``-s^2`` and the running maximum.
    The twin (:func:`best_log_response_ref`) filters with SciPy in float64 accumulation and returns
    float64; here taps are float32 and sums float32 (see the module docstring for the error).
    """
    h = _check_maps(h, "h")
    if h.dtype != np.float32:
        raise TypeError(f"h must be float32, got dtype {h.dtype}")
    sig = [float(s) for s in sigmas]
    if not sig or len(sig) > MAX_SCALES or not all(s > 0 for s in sig):
        raise ValueError(f"sigmas must be 1 to {MAX_SCALES} positive px values, got {list(sigmas)}")
    if not _use_kernel(h):
        return best_log_response_ref(np.asarray(h), sig)
    xp = _launch.device_array_module(h)
    h = _prepare(h, xp)
    best = xp.empty(h.shape, xp.float32)
    best_scale = xp.empty(h.shape, xp.int8)
    if best.size == 0:
        return best, best_scale
    s0 = xp.empty(h.shape, xp.float32)
    s2 = xp.empty(h.shape, xp.float32)
    kern = _kernels(max(h.nbytes, best.nbytes) >= 2**31)
    for i, s in enumerate(sig):
        taps0, taps2 = _taps(s, truncate, xp)
        _launch.launch_1d(kern["along_rows"], best.size, h, taps0, taps2, s0, s2)
        _launch.launch_1d(kern["along_cols"], best.size, s0, s2, taps0, taps2, np.float32(-(s * s)), i,
                          best, best_scale)
    return best, best_scale


def log_response(h: ArrayLike, sigma: float, *, truncate: float = 4.0) -> Any:
    """Scale-normalised LoG response ``-s^2 (d2/dr2 + d2/dc2)(G_s * h)`` at one scale, (N, H, W) float32.

    See :func:`best_log_response` (one scale) for parameters and precision.
    """
    return best_log_response(h, [sigma], truncate=truncate)[0]


def peak_mask(best: ArrayLike, *, window_px: int, threshold: float) -> Any:
    """Local maxima of a response map, as a mask.

    Parameters
    ----------
    best : (N, H, W) float32 or float64, NumPy or CuPy, any strides.
    window_px : odd side of the (1, w, w) window, tile px (``nearest`` boundary, as
        ``scipy.ndimage.maximum_filter``).
    threshold : a peak's value must exceed it (compared in float64).

    Returns
    -------
    (N, H, W) bool on the input's device: ``best`` equals its window maximum, ``> threshold``, and
    the pixel is not on the tile's one-pixel border (so both neighbours exist for sub-pixel fits).

    Raises
    ------
    TypeError : best not float32/float64.
    ValueError : wrong shape, window not a positive odd integer.
    """
    best = _check_maps(best, "best")
    if best.dtype not in (np.float32, np.float64):
        raise TypeError(f"best must be float32 or float64, got dtype {best.dtype}")
    if int(window_px) != window_px or window_px < 1 or window_px % 2 == 0:
        raise ValueError(f"window_px must be a positive odd integer, got {window_px}")
    if not _use_kernel(best):
        return peak_mask_ref(np.asarray(best), window_px=int(window_px), threshold=threshold)
    xp = _launch.device_array_module(best)
    best = _prepare(best, xp)
    out = xp.empty(best.shape, xp.uint8)
    if out.size:
        _launch.launch_1d(_kernels(best.nbytes >= 2**31)["peaks"], out.size, best, int(window_px) // 2,
                          best.dtype.type(threshold), out)
    return out.view(xp.bool_)


# --------------------------------------------------------------------------- benchmark
_BENCH_TILE_PX = 256
_BENCH_SIGMAS = (5.0 / math.sqrt(2), 7.42 / math.sqrt(2), 11.0 / math.sqrt(2))  # 2.5-5.5 µm radii at 0.5 µm/px
_BENCH_H_ROW = (1.88, -0.07, -0.60)  # about the Ruifrok hematoxylin row


def _bench_tiles(rng: np.random.Generator, n_px: int) -> tuple[Any, ...]:
    n = max(1, n_px // _BENCH_TILE_PX**2)
    return rng.integers(0, 256, (n, _BENCH_TILE_PX, _BENCH_TILE_PX, 3), dtype=np.uint8), np.array(_BENCH_H_ROW)


def _bench_h(rng: np.random.Generator, n_px: int) -> tuple[Any, ...]:
    n = max(1, n_px // _BENCH_TILE_PX**2)
    return rng.random((n, _BENCH_TILE_PX, _BENCH_TILE_PX), dtype=np.float32), _BENCH_SIGMAS


def _bench_best(rng: np.random.Generator, n_px: int) -> tuple[Any, ...]:
    return (_bench_h(rng, n_px)[0],)


def bench_cases() -> list[_launch.BenchCase]:
    """Hematoxylin (3 B in, 4 B out per px), 3-scale LoG (per scale: 4 + 8 + 8 + 4 + 1 B per px,
    plus the read-modify-write of the running maximum), 11 x 11 peak mask (4 B in, 1 B out per px)."""
    return [
        _launch.BenchCase("nuclei_hematoxylin", _bench_tiles, hematoxylin, hematoxylin_ref,
                          lambda a: a[0].size // 3 * (3 + 4)),
        _launch.BenchCase("nuclei_best_log_response", _bench_h, best_log_response, best_log_response_ref,
                          lambda a: a[0].size * len(a[1]) * (4 + 8 + 8 + 5 + 5)),
        _launch.BenchCase("nuclei_peak_mask", _bench_best,
                          lambda b: peak_mask(b, window_px=11, threshold=0.3),
                          lambda b: peak_mask_ref(b, window_px=11, threshold=0.3),
                          lambda a: a[0].size * (4 + 1)),
    ]
