"""Tissue-mask pixel features and Otsu threshold on the device.

What it does
    One fused pass over an RGB overview computes, per pixel, HSV saturation, mean grey level and
    the "candidate" flag (neither glass-bright nor black), and accumulates the 256-bin histogram
    of saturation over the pixels that are not black (glass included: its low-saturation mode is
    what Otsu separates tissue from) (block-private histograms in shared memory, merged into
    the global one with one atomic per non-empty bin and block). :func:`otsu_from_histogram`
    turns the histogram into Otsu's threshold on the host (256 numbers).

In and out
    ``rgb``: ``(H, W, 3)`` uint8 overview (grey levels 0..255), any strides. Returns
    ``sat (H, W) float32`` in [0, 1], ``grey (H, W) float32`` in [0, 255], ``candidate (H, W) bool``
    and ``hist (256,) int64`` (bin k counts non-black saturations in ``[k/256, (k+1)/256)``, the
    last bin closed), all on the input's device.

Device
    CuPy input: the Numba CUDA kernel, on CuPy's current stream. NumPy input: the kernel under
    Numba's CUDA simulator when it is on (CI), else the NumPy twin :func:`tissue_features_ref`.

Exactness
    The kernel is bit-identical to the twin (and to :func:`gpupath.tissue.tissue_mask`): every
    value is a float32 max/min/sum of integers followed by one correctly rounded float32
    division, bins are ``trunc(s * 256)`` (exact: the edges k/256 are float32-exact), and the
    histogram is integer counts.

Reference: N. Otsu, "A threshold selection method from gray-level histograms", IEEE SMC 1979.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _launch

# ``numba.cuda``, bound on the first kernel build (not at import). Kernels must reach it through a
# module global: the CUDA simulator swaps globals that are the cuda module for its per-block fake.
cuda: Any = None

__all__ = ["N_BINS", "tissue_features", "tissue_features_ref", "otsu_from_histogram", "bench_cases"]

N_BINS = 256  # saturation histogram bins over [0, 1]
# At most this many blocks (about one full wave on an H100: 132 SMs x 8 blocks of 256 threads), so
# each block's shared histogram covers many pixels and the global merge costs <= 256 atomics a block.
_HIST_MAX_BLOCKS = 1024


# --------------------------------------------------------------------------- kernel factory
@functools.cache
def _features_kernel(idx64: bool) -> Any:
    """Fused saturation / grey / candidate / histogram kernel; ``idx64``: 64-bit pixel indices."""
    import numba

    global cuda  # noqa: PLW0603  (see the comment at the top of the module)
    cuda = _launch.cuda()
    idx_t = numba.int64 if idx64 else numba.int32
    f32, u32, i64 = numba.float32, numba.uint32, numba.int64

    @cuda.jit
    def features(rgb, max_grey, min_grey, sat, grey, cand, hist):
        # rgb (H, W, 3) uint8; max_grey, min_grey float32; sat, grey (H, W) float32;
        # cand (H, W) uint8; hist (N_BINS,) int64, zeroed by the caller
        local = cuda.shared.array(N_BINS, numba.uint32)  # this block's histogram
        for b in range(cuda.threadIdx.x, N_BINS, cuda.blockDim.x):
            local[b] = u32(0)
        cuda.syncthreads()
        width = idx_t(rgb.shape[1])
        n = idx_t(rgb.shape[0] * rgb.shape[1])
        for i in range(idx_t(cuda.grid(1)), n, idx_t(cuda.gridsize(1))):
            r = idx_t(i // width)
            c = idx_t(i - r * width)
            red, green, blue = f32(rgb[r, c, 0]), f32(rgb[r, c, 1]), f32(rgb[r, c, 2])
            # no builtin max/min: Numba's CUDA target fails to type their overloads on scalars
            vmax = red if red > green else green
            vmax = vmax if vmax > blue else blue
            vmin = red if red < green else green
            vmin = vmin if vmin < blue else blue
            s = (vmax - vmin) / (vmax if vmax > f32(1.0) else f32(1.0))
            # a sum of three integers is exact in float32; float32 / 3 correctly rounded equals
            # NumPy's mean (float64 quotient rounded to float32: x/3 never lies on a float32 tie)
            g = (red + green + blue) / f32(3.0)
            sat[r, c] = s
            grey[r, c] = g
            cand[r, c] = 1 if (g < max_grey and g > min_grey) else 0
            if g > min_grey:  # Otsu's population: every pixel that is not black, glass included
                # s * 256 is exact, so truncation gives np.histogram's bin; s == 1 goes to the last
                b = idx_t(s * f32(N_BINS))
                cuda.atomic.add(local, b if b < N_BINS else N_BINS - 1, u32(1))
        cuda.syncthreads()
        # one global atomic per non-empty bin and block; a block counts < 2**32 pixels
        for b in range(cuda.threadIdx.x, N_BINS, cuda.blockDim.x):
            count = local[b]
            if count != 0:
                cuda.atomic.add(hist, b, i64(count))

    return features


# --------------------------------------------------------------------------- NumPy twins
def tissue_features_ref(rgb: np.ndarray, *, max_grey: float = 235.0, min_grey: float = 25.0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NumPy twin of :func:`tissue_features`: the expressions of :func:`gpupath.tissue.tissue_mask`."""
    f = np.asarray(rgb).astype(np.float32)
    vmax = f.max(axis=-1)
    sat = (vmax - f.min(axis=-1)) / np.maximum(vmax, 1.0)
    grey = f.mean(axis=-1)
    candidate = (grey < max_grey) & (grey > min_grey)
    hist, _ = np.histogram(sat[grey > min_grey], bins=N_BINS, range=(0.0, 1.0))
    return sat, grey, candidate, hist.astype(np.int64)


def otsu_from_histogram(hist: ArrayLike) -> float:
    """Otsu's threshold from a 256-bin histogram over [0, 1] (host; a few microseconds).

    Parameters
    ----------
    hist : (256,) integer counts, NumPy (a device histogram is 2 KiB: copy it to the host first).

    Returns
    -------
    The centre of the bin that maximises the between-class variance; where the criterion is flat
    (empty bins between two modes), the centre of the middle bin of that plateau. Identical to
    :func:`gpupath.tissue.otsu_threshold` on the values the histogram counts. An all-zero
    histogram is flat everywhere and gives the middle bin's centre (255/512); callers with no
    candidate pixels choose their own threshold instead.
    """
    counts = np.asarray(hist, np.float64)
    if counts.shape != (N_BINS,):
        raise ValueError(f"hist must be ({N_BINS},) counts, got shape {counts.shape}")
    centres = (np.arange(N_BINS, dtype=np.float64) + 0.5) / N_BINS  # (2k+1)/512: exact, as np.histogram's edges
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(centres[int(best[0] + best[-1]) // 2])


# --------------------------------------------------------------------------- public wrapper
def _check_rgb(rgb: Any) -> None:
    if getattr(rgb, "ndim", None) != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got shape {tuple(getattr(rgb, 'shape', ()))}")
    if rgb.dtype != np.uint8:
        raise TypeError(f"rgb must be uint8 RGB, got dtype {rgb.dtype}")


def tissue_features(rgb: ArrayLike, *, max_grey: float = 235.0, min_grey: float = 25.0) -> tuple[Any, Any, Any, Any]:
    """Saturation, grey level, candidate flag and candidate-saturation histogram in one pass.

    Parameters
    ----------
    rgb : (H, W, 3) uint8, NumPy or CuPy, any strides. Grey levels 0..255.
    max_grey, min_grey : mean grey level bounds (0-255, exclusive): candidates are
        ``min_grey < grey < max_grey`` (compared in float32, as NumPy compares a float32 array
        with a Python float).

    Returns
    -------
    sat : (H, W) float32, HSV saturation ``(max - min) / max(max, 1)`` in [0, 1].
    grey : (H, W) float32, mean of R, G, B.
    candidate : (H, W) bool.
    hist : (256,) int64, histogram of ``sat[grey > min_grey]`` over [0, 1] (``np.histogram`` bins).

    Raises
    ------
    ValueError, TypeError : wrong shape or dtype.

    Notes
    -----
    Bit-identical to :func:`tissue_features_ref` (see the module docstring). The histogram uses
    shared-memory atomics per block (256 x uint32) and one int64 global atomic per bin and block.
    """
    _check_rgb(rgb)
    if not (_launch.is_device_array(rgb) or _launch.simulator_enabled()):
        return tissue_features_ref(np.asarray(rgb), max_grey=max_grey, min_grey=min_grey)
    xp = _launch.device_array_module(rgb)
    if xp is np:
        rgb = np.ascontiguousarray(rgb)  # the simulator copies host arrays and wants them contiguous
    rows, cols = int(rgb.shape[0]), int(rgb.shape[1])
    sat = xp.empty((rows, cols), xp.float32)
    grey = xp.empty((rows, cols), xp.float32)
    cand = xp.empty((rows, cols), xp.uint8)
    hist = xp.zeros(N_BINS, xp.int64)
    n = rows * cols
    if n:
        idx64 = max(rgb.nbytes, sat.nbytes) >= 2**31
        _launch.launch_1d(_features_kernel(idx64), n, rgb, np.float32(max_grey), np.float32(min_grey),
                          sat, grey, cand, hist, max_blocks=_HIST_MAX_BLOCKS)
    return sat, grey, cand.view(xp.bool_), hist


# --------------------------------------------------------------------------- benchmark
def _bench_input(rng: np.random.Generator, n_px: int) -> tuple[Any, ...]:
    side = max(1, int(np.sqrt(n_px)))
    return (rng.integers(0, 256, (side, max(1, n_px // side), 3), dtype=np.uint8),)


def bench_cases() -> list[_launch.BenchCase]:
    """The fused feature + histogram kernel vs its twin (reads 3 B, writes 9 B per pixel)."""
    return [_launch.BenchCase(
        name="tissue_features",
        make_input=_bench_input,
        run=tissue_features,
        run_twin=tissue_features_ref,
        bytes_moved=lambda args: int(np.prod(args[0].shape[:2])) * (3 + 4 + 4 + 1) + N_BINS * 8,
    )]
