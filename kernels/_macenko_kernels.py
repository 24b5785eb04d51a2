"""Numba CUDA kernels of the Macenko fit and apply (the factories; wrappers and twins live in
:mod:`gpupath_kernels.macenko`). Each factory compiles its kernel lazily, on first use, and caches it.

Kernels see ``numba.cuda`` as the module global ``cuda`` (bound on first build): Numba's CUDA
simulator swaps module globals named like that, not closure variables.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _launch
from ._launch import to_host

_N_STATS = 10  # count, sum r, g, b, rr, rg, rb, gg, gb, bb
_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
_PX_PER_THREAD_STATS = 16  # a block sums 4096 px into one partial row
_PX_PER_THREAD_HIST = 64  # a block bins 16384 px per shared histogram it clears and flushes

cuda: Any = None  # numba.cuda, bound by _cuda() on first kernel build (the simulator swaps this global)


def _cuda() -> Any:
    global cuda  # noqa: PLW0603  kernels must see numba.cuda as a module global (simulator)
    if cuda is None:
        cuda = _launch.cuda()
    return cuda


# --------------------------------------------------------------------------- kernels


@functools.cache
def _od_stats_kernel() -> Any:
    cu = _cuda()
    from numba import float64

    tpb = _launch.THREADS_PER_BLOCK
    n_stats = _N_STATS

    @cu.jit
    def od_stats_partial(px, lut, beta, partial):
        # px (G, P, 3) u1; lut (256,) f8; partial (G, blocks, 10) f8: one row per block, no atomics
        sh = cuda.shared.array((n_stats, tpb), float64)
        grp = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        n = 0.0
        sr = 0.0
        sg = 0.0
        sb = 0.0
        srr = 0.0
        srg = 0.0
        srb = 0.0
        sgg = 0.0
        sgb = 0.0
        sbb = 0.0
        for i in range(cuda.grid(1), px.shape[1], cuda.gridsize(1)):
            r = lut[px[grp, i, 0]]
            g = lut[px[grp, i, 1]]
            b = lut[px[grp, i, 2]]
            if r >= beta and g >= beta and b >= beta:  # tissue: OD >= beta in all channels
                n += 1.0
                sr += r
                sg += g
                sb += b
                srr += r * r
                srg += r * g
                srb += r * b
                sgg += g * g
                sgb += g * b
                sbb += b * b
        sh[0, tid] = n
        sh[1, tid] = sr
        sh[2, tid] = sg
        sh[3, tid] = sb
        sh[4, tid] = srr
        sh[5, tid] = srg
        sh[6, tid] = srb
        sh[7, tid] = sgg
        sh[8, tid] = sgb
        sh[9, tid] = sbb
        cuda.syncthreads()
        step = cuda.blockDim.x // 2  # tree reduction: fixed order, blockDim a power of two
        while step > 0:
            if tid < step:
                for k in range(n_stats):
                    sh[k, tid] += sh[k, tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            for k in range(n_stats):
                partial[grp, cuda.blockIdx.x, k] = sh[k, 0]

    return od_stats_partial


@functools.cache
def _angle_histogram_kernel(n_bins: int) -> Any:
    cu = _cuda()
    from numba import int64, uint32

    @cu.jit
    def angle_histogram(px, lut, beta, lo, inv_width, plane, active, hist):
        # plane (G, 3, 2) f8 (e1, e2 columns); active (G,) u1; hist (G, n_bins) i8, zeroed
        grp = cuda.blockIdx.y
        if active[grp] == 0:  # uniform over the block: before any barrier
            return
        sh = cuda.shared.array(n_bins, uint32)
        tid = cuda.threadIdx.x
        for k in range(tid, n_bins, cuda.blockDim.x):
            sh[k] = 0
        cuda.syncthreads()
        a0, a1, a2 = plane[grp, 0, 0], plane[grp, 1, 0], plane[grp, 2, 0]
        b0, b1, b2 = plane[grp, 0, 1], plane[grp, 1, 1], plane[grp, 2, 1]
        for i in range(cuda.grid(1), px.shape[1], cuda.gridsize(1)):
            r = lut[px[grp, i, 0]]
            g = lut[px[grp, i, 1]]
            b = lut[px[grp, i, 2]]
            if r >= beta and g >= beta and b >= beta:
                phi = math.atan2(r * b0 + g * b1 + b * b2, r * a0 + g * a1 + b * a2)
                k = math.floor((phi - lo) * inv_width)
                if k < 0:  # no min/max builtins: explicit clamps compile without a device
                    k = 0
                elif k >= n_bins:
                    k = n_bins - 1
                cuda.atomic.add(sh, k, uint32(1))
        cuda.syncthreads()
        for k in range(tid, n_bins, cuda.blockDim.x):
            c = sh[k]
            if c != 0:
                cuda.atomic.add(hist, (grp, k), int64(c))

    return angle_histogram


@functools.cache
def _concentration_histogram_kernel(n_bins: int) -> Any:
    cu = _cuda()
    from numba import int64, uint32

    row = n_bins + 1  # bin 0: below the window; 1..n_bins: the window
    n_shared = 2 * row

    @cu.jit
    def concentration_histogram(px, lut, pinv, active, lo1, inv_w1, win_lo, win_hi, lo2, inv_w2, hist):
        # pinv (G, 2, 3) f8; lo1 .. inv_w2 (G, 2) (win_* i8); hist (G, 2, n_bins + 1) i8, zeroed
        grp = cuda.blockIdx.y
        if active[grp] == 0:
            return
        sh = cuda.shared.array(n_shared, uint32)
        tid = cuda.threadIdx.x
        for k in range(tid, n_shared, cuda.blockDim.x):
            sh[k] = 0
        cuda.syncthreads()
        below0 = 0
        below1 = 0
        for i in range(cuda.grid(1), px.shape[1], cuda.gridsize(1)):
            r = lut[px[grp, i, 0]]
            g = lut[px[grp, i, 1]]
            b = lut[px[grp, i, 2]]
            for j in range(2):
                x = pinv[grp, j, 0] * r + pinv[grp, j, 1] * g + pinv[grp, j, 2] * b
                k1 = math.floor((x - lo1[grp, j]) * inv_w1[grp, j])
                if k1 < 0:
                    k1 = 0
                elif k1 >= n_bins:
                    k1 = n_bins - 1
                if k1 < win_lo[grp, j]:
                    if j == 0:
                        below0 += 1
                    else:
                        below1 += 1
                elif k1 <= win_hi[grp, j]:
                    k2 = math.floor((x - lo2[grp, j]) * inv_w2[grp, j])
                    if k2 < 0:
                        k2 = 0
                    elif k2 >= n_bins:
                        k2 = n_bins - 1
                    cuda.atomic.add(sh, j * row + 1 + k2, uint32(1))
        if below0 != 0:
            cuda.atomic.add(sh, 0, uint32(below0))
        if below1 != 0:
            cuda.atomic.add(sh, row, uint32(below1))
        cuda.syncthreads()
        for k in range(tid, n_shared, cuda.blockDim.x):
            c = sh[k]
            if c != 0:
                cuda.atomic.add(hist, (grp, k // row, k % row), int64(c))

    return concentration_histogram


@functools.cache
def _apply_kernel() -> Any:
    cu = _cuda()
    from numba import float32

    @cu.jit
    def apply(px, lut, mt, io_out, pinv, scale, active, out):
        # lut (256,) f4; mt (3, 2) f4 target stains; io_out f4; pinv (G, 2, 3) f4; scale (G, 2) f4
        grp = cuda.blockIdx.y
        one = float32(1.0)
        lo = float32(-1.0)
        hi = float32(256.0)
        p00, p01, p02 = pinv[grp, 0, 0], pinv[grp, 0, 1], pinv[grp, 0, 2]
        p10, p11, p12 = pinv[grp, 1, 0], pinv[grp, 1, 1], pinv[grp, 1, 2]
        s0, s1 = scale[grp, 0], scale[grp, 1]
        for i in range(cuda.grid(1), px.shape[1], cuda.gridsize(1)):
            if active[grp] == 0:  # a tile without a fit is copied unchanged
                for c in range(3):
                    out[grp, i, c] = px[grp, i, c]
                continue
            r = lut[px[grp, i, 0]]
            g = lut[px[grp, i, 1]]
            b = lut[px[grp, i, 2]]
            c0 = (p00 * r + p01 * g + p02 * b) * s0
            c1 = (p10 * r + p11 * g + p12 * b) * s1
            for c in range(3):
                y = io_out * math.exp(-(c0 * mt[c, 0] + c1 * mt[c, 1])) - one
                if y < lo:  # clip before the integer conversion (inf -> 255): same result
                    y = lo
                elif y > hi:
                    y = hi
                v = round(y)  # round(): llrint, half to even, as np.rint
                if v < 0:
                    v = 0
                elif v > 255:
                    v = 255
                out[grp, i, c] = v

    return apply


# --------------------------------------------------------------------------- host helpers shared by the wrappers


def od_lut(io: float, dtype: Any) -> np.ndarray:
    """OD of grey levels 0..255 in ``dtype`` (:func:`_launch.od_table`: the stain stage's expression)."""
    return _launch.od_table(io, dtype)


def od_lut_on(xp: Any, io: float, dtype: Any) -> Any:
    """:func:`od_lut` on ``xp``'s device: NumPy as is; CuPy uploaded once per device, io and dtype."""
    if xp is np:
        return od_lut(io, dtype)
    return _device_od_lut(xp.cuda.Device().id, float(io), np.dtype(dtype).str)


@functools.lru_cache(maxsize=32)
def _device_od_lut(device: int, io: float, dtype: str) -> Any:
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(od_lut(io, np.dtype(dtype)))


def group_pixels(rgb: ArrayLike, *, per_tile: bool) -> Any:
    """(G, P, 3) C-contiguous uint8 on the input's module: G = N tiles if ``per_tile``, else 1.

    ``rgb`` is (H, W, 3) or (N, H, W, 3); a non-contiguous view is copied once (kernels index
    (group, pixel, channel) of a dense array).
    """
    xp = _launch.device_array_module(rgb)
    arr = xp.ascontiguousarray(rgb)
    if arr.ndim == 3:
        arr = arr[None]
    n, h, w, _ = arr.shape
    return arr.reshape(n, h * w, 3) if per_tile else arr.reshape(1, n * h * w, 3)


def _use_kernels(px: Any) -> bool:
    return _launch.is_device_array(px) or _launch.simulator_enabled()


def _active(active: ArrayLike | None, n_groups: int) -> np.ndarray:
    return np.ones(n_groups, np.uint8) if active is None else np.asarray(active, dtype=np.uint8)


def _order_stat_bins(hist: Any, ranks: np.ndarray) -> np.ndarray:
    """Bin holding the rank-th smallest value (0-based): hist (..., B) ints, ranks (..., R) host."""
    xp = _launch.device_array_module(hist)
    cum = xp.cumsum(hist, axis=-1)
    r = xp.asarray(np.asarray(ranks, dtype=np.int64))
    return to_host((cum[..., None, :] <= r[..., :, None]).sum(axis=-1))  # host: (..., R) bin indices


def _ranks(n: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order statistics k0, k1 and weight of np.percentile's linear interpolation (n >= 1)."""
    n = np.maximum(np.asarray(n, dtype=np.int64), 1)
    h = (q / 100.0) * (n - 1)
    k0 = np.floor(h)
    return k0.astype(np.int64), np.minimum(k0 + 1, n - 1).astype(np.int64), h - k0


def _percentile_from_hist(hist: Any, n: np.ndarray, q: float, lo: Any, width: Any) -> np.ndarray:
    """np.percentile(values, q) to within width / 2 from their histogram (bin midpoints)."""
    k0, k1, frac = _ranks(n, q)
    bins = _order_stat_bins(hist, np.stack([k0, k1], axis=-1))
    mid = lo[..., None] + (bins + 0.5) * width[..., None]
    return mid[..., 0] + frac * (mid[..., 1] - mid[..., 0])


_STATIC_SHARED_BYTES = 48 * 1024  # CUDA's static shared-memory limit per block


def _check_shared_bins(n_bins: int, bytes_per_bin: int, what: str) -> None:
    """A shared-memory histogram must fit the 48 KiB static limit (ptxas accepts more; the launch fails)."""
    if not 1 <= n_bins * bytes_per_bin <= _STATIC_SHARED_BYTES:
        raise ValueError(f"{what}: {n_bins} bins x {bytes_per_bin} B exceed the {_STATIC_SHARED_BYTES} B of "
                         "static shared memory per block")
