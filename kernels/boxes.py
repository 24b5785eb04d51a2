"""Centre ownership of detections on a tile grid, on the device (the parallel step of de-duplication).

What it does
    For each detection, from its centre and the (col, row) of the tile that reported it, decides
    whether that tile owns the centre (:func:`gpupath.detect.boxes.own_by_centre`): tile k owns
    ``[k * stride + overlap / 2, (k + 1) * stride + overlap / 2)`` on each axis (first tile from
    -inf, last to +inf). Writes two masks over the detections: ``keep`` (owned, or within
    ``margin`` of the owned area, or owned by a tile that was not processed) and ``look`` (the
    kept ones a later suppression pass must examine: near a boundary or orphaned). Usable by any
    detector that reports centres per tile.

In and out
    ``cx, cy``: (M,) float64 level-0 px. ``col, row``: (M,) int64 grid cell of each detection's
    source tile. ``processed``: (n_rows, n_cols) uint8, non-zero where the tile was read. Returns
    ``keep, look``: (M,) bool on the input's device.

Device
    CuPy input: the kernel, on CuPy's current stream. NumPy input: the kernel under Numba's CUDA
    simulator when it is on (CI), else the NumPy twin :func:`own_by_centre_ref`.

Not here
    The greedy near-duplicate suppression (:func:`gpupath.detect.boxes.suppress_near_duplicates`)
    stays on the host: it visits detections best score first and each decision depends on all
    earlier ones, a sequential chain; after ownership it only sees the few detections near tile
    boundaries.

Exactness
    The same float64 operations in the same order as the twin (subtract, correctly rounded divide,
    floor, clip): the masks are identical. Centres must be finite.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _launch

# ``numba.cuda``, bound on the first kernel build (not at import). Kernels must reach it through a
# module global: the CUDA simulator swaps globals that are the cuda module for its per-block fake.
cuda: Any = None

__all__ = ["own_by_centre", "own_by_centre_ref", "bench_cases"]


# --------------------------------------------------------------------------- kernel factory
@functools.cache
def _own_kernel(idx64: bool) -> Any:
    """Ownership kernel; ``idx64``: 64-bit detection indices."""
    import numba

    global cuda  # noqa: PLW0603  (see the comment at the top of the module)
    cuda = _launch.cuda()
    idx_t = numba.int64 if idx64 else numba.int32
    i64 = numba.int64

    @cuda.jit(device=True)
    def owner(v, half, stride, n):
        # grid index owning coordinate v: clip(floor((v - half) / stride), 0, n - 1)
        q = (v - half) / stride
        if not q >= 0.0:  # floor(q) < 0 (NaN also lands here)
            return i64(0)
        if q >= n - 1:
            return i64(n - 1)
        return i64(math.floor(q))

    @cuda.jit
    def own(cx, cy, col, row, stride, half, margin, processed, keep, look):
        # cx, cy (M,) float64; col, row (M,) int64; stride, half, margin float64;
        # processed (n_rows, n_cols) uint8; keep, look (M,) uint8
        n_rows = i64(processed.shape[0])
        n_cols = i64(processed.shape[1])
        n = idx_t(cx.shape[0])
        for i in range(idx_t(cuda.grid(1)), n, idx_t(cuda.gridsize(1))):
            x = cx[i]
            y = cy[i]
            tile_c = col[i]
            tile_r = row[i]
            own_c = owner(x, half, stride, n_cols)
            own_r = owner(y, half, stride, n_rows)
            owned = own_c == tile_c and own_r == tile_r
            near = False
            if margin > 0.0 and not owned:
                near = (owner(x - margin, half, stride, n_cols) <= tile_c
                        and tile_c <= owner(x + margin, half, stride, n_cols)
                        and owner(y - margin, half, stride, n_rows) <= tile_r
                        and tile_r <= owner(y + margin, half, stride, n_rows))
            orphan = processed[own_r, own_c] == 0
            keep[i] = 1 if (owned or near or orphan) else 0
            look[i] = 1 if (near or orphan) else 0

    return own


# --------------------------------------------------------------------------- NumPy twin
def own_by_centre_ref(cx: np.ndarray, cy: np.ndarray, col: np.ndarray, row: np.ndarray, *, stride_l0: float,
                      overlap_l0: float, processed: np.ndarray, margin_l0_px: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of :func:`own_by_centre`: the expressions of ``gpupath.detect.boxes.own_by_centre``."""
    cx, cy = np.asarray(cx, np.float64), np.asarray(cy, np.float64)
    col, row = np.asarray(col, np.int64), np.asarray(row, np.int64)
    n_rows, n_cols = processed.shape

    def owner(c: np.ndarray, n: int) -> np.ndarray:
        return np.clip(np.floor((c - overlap_l0 / 2) / stride_l0), 0, n - 1).astype(np.int64)

    own_c, own_r = owner(cx, n_cols), owner(cy, n_rows)
    owned = (own_c == col) & (own_r == row)
    near = np.zeros(len(cx), bool)
    if margin_l0_px > 0:
        near = ((owner(cx - margin_l0_px, n_cols) <= col) & (col <= owner(cx + margin_l0_px, n_cols))
                & (owner(cy - margin_l0_px, n_rows) <= row) & (row <= owner(cy + margin_l0_px, n_rows)) & ~owned)
    orphan = np.asarray(processed)[own_r, own_c] == 0
    return owned | near | orphan, near | orphan


# --------------------------------------------------------------------------- public wrapper
def own_by_centre(cx: ArrayLike, cy: ArrayLike, col: ArrayLike, row: ArrayLike, *, stride_l0: float,
                  overlap_l0: float, processed: ArrayLike, margin_l0_px: float = 0.0) -> tuple[Any, Any]:
    """Which detections their source tile owns (with a boundary margin and orphans).

    Parameters
    ----------
    cx, cy : (M,) detection centres, level-0 px (cast to float64).
    col, row : (M,) integer grid cell (column, row) of each detection's source tile.
    stride_l0 : distance between neighbouring tile origins, level-0 px (> 0).
    overlap_l0 : width shared by neighbouring tiles, level-0 px (>= 0).
    processed : (n_rows, n_cols) uint8 (or bool), non-zero where the tile was read; its shape
        gives the grid size.
    margin_l0_px : detections within this distance of their tile's owned area are kept too
        (level-0 px, >= 0; 0 disables the rule).

    Returns
    -------
    keep : (M,) bool, owned | near | orphan.
    look : (M,) bool, near | orphan (over all M; the caller selects ``look[keep]``).

    Raises
    ------
    ValueError : shapes disagree, empty grid, stride not positive, overlap or margin negative.

    Notes
    -----
    Identical to :func:`own_by_centre_ref` and to :func:`gpupath.detect.boxes.own_by_centre`
    (whose ``processed`` set is this bitmap). Arrays of one device: all NumPy or all CuPy.
    """
    if not _launch.is_device_array(cx):
        cx, cy, col, row, processed = (np.asarray(a) for a in (cx, cy, col, row, processed))
    m = cx.shape[0] if cx.ndim == 1 else -1
    if m < 0 or any(a.shape != (m,) for a in (cy, col, row)):
        raise ValueError(f"cx, cy, col, row must be (M,) arrays of one length, got shapes "
                         f"{[tuple(a.shape) for a in (cx, cy, col, row)]}")
    if processed.ndim != 2 or 0 in processed.shape:
        raise ValueError(f"processed must be a non-empty (n_rows, n_cols) bitmap, got shape {tuple(processed.shape)}")
    if not stride_l0 > 0 or not overlap_l0 >= 0 or not margin_l0_px >= 0:
        raise ValueError(f"need stride_l0 > 0, overlap_l0 >= 0, margin_l0_px >= 0; got {stride_l0}, {overlap_l0}, "
                         f"{margin_l0_px}")
    if not (_launch.is_device_array(cx) or _launch.simulator_enabled()):
        return own_by_centre_ref(cx, cy, col, row, stride_l0=stride_l0, overlap_l0=overlap_l0,
                                 processed=processed, margin_l0_px=margin_l0_px)
    xp = _launch.device_array_module(cx)
    cx, cy = xp.asarray(cx, xp.float64), xp.asarray(cy, xp.float64)
    col, row = xp.asarray(col, xp.int64), xp.asarray(row, xp.int64)
    processed = xp.asarray(processed).astype(xp.uint8, copy=False)
    if xp is np:  # the simulator copies host arrays and wants them contiguous
        cx, cy, col, row, processed = (np.ascontiguousarray(a) for a in (cx, cy, col, row, processed))
    keep = xp.empty(m, xp.uint8)
    look = xp.empty(m, xp.uint8)
    if m:
        _launch.launch_1d(_own_kernel(cx.nbytes >= 2**31), m, cx, cy, col, row, float(stride_l0),
                          float(overlap_l0) / 2, float(margin_l0_px), processed, keep, look)
    return keep.view(xp.bool_), look.view(xp.bool_)


# --------------------------------------------------------------------------- benchmark
_BENCH_STRIDE, _BENCH_OVERLAP, _BENCH_GRID = 448.0, 64.0, 64


def _bench_input(rng: np.random.Generator, n_px: int) -> tuple[Any, ...]:
    """About one detection per 100 px: random centres in a 64 x 64 grid, each reported by a tile
    that sees it (its owner or a neighbour), 90 % of tiles processed."""
    m = max(1, n_px // 100)
    extent = _BENCH_STRIDE * _BENCH_GRID
    cx, cy = rng.uniform(0, extent, m), rng.uniform(0, extent, m)
    col = np.clip(np.floor(cx / _BENCH_STRIDE) - rng.integers(0, 2, m), 0, _BENCH_GRID - 1).astype(np.int64)
    row = np.clip(np.floor(cy / _BENCH_STRIDE) - rng.integers(0, 2, m), 0, _BENCH_GRID - 1).astype(np.int64)
    processed = (rng.random((_BENCH_GRID, _BENCH_GRID)) < 0.9).astype(np.uint8)
    return cx, cy, col, row, processed


def _bench_run(fn: Any) -> Any:
    return lambda cx, cy, col, row, processed: fn(cx, cy, col, row, stride_l0=_BENCH_STRIDE,
                                                 overlap_l0=_BENCH_OVERLAP, processed=processed, margin_l0_px=5.0)


def bench_cases() -> list[_launch.BenchCase]:
    """Ownership kernel vs twin; "n_px" / 100 detections, 34 B moved per detection."""
    return [_launch.BenchCase("boxes_own_by_centre", _bench_input, _bench_run(own_by_centre),
                              _bench_run(own_by_centre_ref), lambda a: a[0].shape[0] * (8 + 8 + 8 + 8 + 1 + 1))]
