"""Numba CUDA kernels for Vahadane stain separation: sparse coding and fused apply.

Kernels (compiled lazily, on first launch; grid-stride loops; results in ``out`` arrays)
    * ``nn_lasso``: the H update of the dictionary learning. For every pixel (one thread each)
      the exact minimiser of ``0.5 * |v - W h|^2 + lam * (h0 + h1)`` over ``h >= 0``, with
      ``v`` the pixel's OD (3,) and ``W`` the (3, 2) stain matrix. Two unknowns: the minimiser
      is the unconstrained one when that is positive, else the better of the two one-stain
      solutions (see :func:`nn_lasso_ref`), which is what ISTA/FISTA steps with soft-threshold
      and clipping converge to, without a step size or an iteration count.
    * ``vahadane_apply``: uint8 RGB -> OD -> ``nn_lasso`` concentrations under the source stains
      -> per-stain scale -> OD under the target stains -> ``io * exp(-OD) - 1``, rint, clip,
      uint8, in one pass.

Each has a NumPy twin ``<name>_ref`` (plain, vectorised, the statement of what the kernel
computes) and a public wrapper that validates, allocates with
:func:`gpupath_kernels._launch.device_array_module` (CuPy for device arrays, NumPy under the
simulator) and launches. All per-pixel maths is float64 in kernels and twins.

Shapes: pixels are rows, ``od`` (P, 3) float32/float64, ``h`` (P, 2) float64, ``rgb`` (P, 3)
uint8; stain matrices (3, 2) with R, G, B rows and H, E columns (host or device arrays; they
are read on the host and passed to the kernels as scalars).

References: A. Vahadane et al., "Structure-preserving color normalization and sparse stain
separation for histological images", IEEE TMI 35(8), 2016; J. Mairal et al., "Online learning
for matrix factorization and sparse coding", JMLR 11, 2010 (the W update in gpupath.vahadane).
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any

import numpy as np

from . import _launch

__all__ = [
    "nn_lasso",
    "nn_lasso_ref",
    "vahadane_apply",
    "vahadane_apply_ref",
    "bench_cases",
]

_FLOATS = (np.float32, np.float64)
_DET_RTOL = 1e-12  # det(W^T W) <= this * g00 * g11: columns parallel, no two-stain solution

# numba.cuda, bound by _kernels() on first use. A module global, not a local: the CUDA simulator
# runs kernels with the numba.cuda module in their globals swapped for its fake one.
cuda: Any = None


# --------------------------------------------------------------------------- kernel factory


@functools.cache
def _kernels() -> types.SimpleNamespace:
    """Compile-on-first-use kernels; Numba specialises each on its argument types."""
    global cuda  # noqa: PLW0603  (see the comment at its definition)
    cuda = _launch.cuda()

    @cuda.jit(device=True)
    def solve2(v0, v1, v2, w00, w10, w20, w01, w11, w21, lam):
        """Exact non-negative lasso for one pixel; the scalar form of nn_lasso_ref."""
        g00 = w00 * w00 + w10 * w10 + w20 * w20
        g01 = w00 * w01 + w10 * w11 + w20 * w21
        g11 = w01 * w01 + w11 * w11 + w21 * w21
        c0 = w00 * v0 + w10 * v1 + w20 * v2 - lam
        c1 = w01 * v0 + w11 * v1 + w21 * v2 - lam
        det = g00 * g11 - g01 * g01
        if det > _DET_RTOL * g00 * g11:
            i0 = (g11 * c0 - g01 * c1) / det
            i1 = (g00 * c1 - g01 * c0) / det
            if i0 > 0.0 and i1 > 0.0:
                return i0, i1
        a0 = c0 / g00 if c0 > 0.0 else 0.0  # conditionals, not max(): typed alike on device and simulator
        b1 = c1 / g11 if c1 > 0.0 else 0.0
        if -0.5 * b1 * c1 < -0.5 * a0 * c0:  # objective of (0, b1) below that of (a0, 0)
            return 0.0, b1
        return a0, 0.0

    @cuda.jit(device=True)
    def to_uint8(y):
        """clip(rint(y), 0, 255) as np.rint does it: half to even (ties are rare but exact)."""
        r = math.floor(y + 0.5)
        if r - y == 0.5 and r % 2.0 != 0.0:
            r -= 1.0
        if r < 0.0:
            return 0
        if r > 255.0:
            return 255
        return int(r)

    @cuda.jit
    def nn_lasso_k(od, w00, w10, w20, w01, w11, w21, lam, out):
        for i in range(cuda.grid(1), od.shape[0], cuda.gridsize(1)):
            h0, h1 = solve2(float(od[i, 0]), float(od[i, 1]), float(od[i, 2]), w00, w10, w20, w01, w11, w21, lam)
            out[i, 0] = h0
            out[i, 1] = h1

    @cuda.jit
    def apply_k(rgb, s00, s10, s20, s01, s11, s21, lam, k0, k1, t00, t10, t20, t01, t11, t21, io_s, io_t, out):
        for i in range(cuda.grid(1), rgb.shape[0], cuda.gridsize(1)):
            v0 = math.log(io_s / (float(rgb[i, 0]) + 1.0))
            v1 = math.log(io_s / (float(rgb[i, 1]) + 1.0))
            v2 = math.log(io_s / (float(rgb[i, 2]) + 1.0))
            h0, h1 = solve2(v0, v1, v2, s00, s10, s20, s01, s11, s21, lam)
            h0 *= k0
            h1 *= k1
            y0 = io_t * math.exp(-(t00 * h0 + t01 * h1)) - 1.0
            y1 = io_t * math.exp(-(t10 * h0 + t11 * h1)) - 1.0
            y2 = io_t * math.exp(-(t20 * h0 + t21 * h1)) - 1.0
            out[i, 0] = to_uint8(y0)
            out[i, 1] = to_uint8(y1)
            out[i, 2] = to_uint8(y2)

    return types.SimpleNamespace(nn_lasso=nn_lasso_k, apply=apply_k)


# --------------------------------------------------------------------------- NumPy twins


def nn_lasso_ref(od: np.ndarray, stain_matrix_od: np.ndarray, lam: float) -> np.ndarray:
    """Per-pixel non-negative lasso: ``argmin_{h >= 0} 0.5 |v - W h|^2 + lam * sum(h)``.

    Parameters
    ----------
    od : (P, 3) float array
        OD of P pixels (R, G, B).
    stain_matrix_od : (3, 2) float array
        W, stain vectors as columns.
    lam : float
        L1 weight, OD units, >= 0.

    Returns
    -------
    h : (P, 2) float64 ndarray
        Concentrations, >= 0.

    Notes
    -----
    With ``G = W^T W`` and ``c = W^T v - lam``, the objective is ``0.5 h^T G h - c^T h``.
    If ``G^-1 c > 0`` it is the minimiser. Otherwise the minimiser has a zero and is the better
    of ``(max(c0 / G00, 0), 0)`` (objective ``-0.5 h0 c0``) and ``(0, max(c1 / G11, 0))``;
    ties go to the first. Parallel columns (``det G <= 1e-12 G00 G11``) skip the two-stain case.
    """
    v = np.asarray(od, dtype=np.float64)
    w = np.asarray(stain_matrix_od, dtype=np.float64)
    g = w.T @ w
    c0 = v @ w[:, 0] - lam  # (P,) contiguous columns: 1-d ufuncs, no axis reductions
    c1 = v @ w[:, 1] - lam
    a0 = np.maximum(c0 / g[0, 0], 0.0)
    b1 = np.maximum(c1 / g[1, 1], 0.0)
    take_b = -0.5 * b1 * c1 < -0.5 * a0 * c0
    h0 = np.where(take_b, 0.0, a0)
    h1 = np.where(take_b, b1, 0.0)
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    if det > _DET_RTOL * g[0, 0] * g[1, 1]:
        i0 = (g[1, 1] * c0 - g[0, 1] * c1) / det  # G^-1 c per pixel
        i1 = (g[0, 0] * c1 - g[0, 1] * c0) / det
        both = (i0 > 0) & (i1 > 0)
        h0 = np.where(both, i0, h0)
        h1 = np.where(both, i1, h1)
    return np.stack([h0, h1], axis=1)


def vahadane_apply_ref(
    rgb: np.ndarray,
    source_matrix: np.ndarray,
    target_matrix: np.ndarray,
    conc_scale: np.ndarray,
    lam: float,
    io_source: float,
    io_target: float,
) -> np.ndarray:
    """Re-render (P, 3) uint8 pixels: nn_lasso under the source, scale, target, rint, clip.

    ``OD = ln(io_source / (rgb + 1))``; ``h = nn_lasso_ref(OD, source_matrix, lam) * conc_scale``;
    ``out = clip(rint(io_target * exp(-h @ target_matrix.T) - 1), 0, 255)`` as uint8 (P, 3).
    """
    od = np.log(float(io_source) / (np.asarray(rgb, dtype=np.float64) + 1.0))
    h = nn_lasso_ref(od, source_matrix, lam) * np.asarray(conc_scale, dtype=np.float64)
    y = float(io_target) * np.exp(-(h @ np.asarray(target_matrix, dtype=np.float64).T)) - 1.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- wrappers


def _host_matrix(m: Any, name: str) -> np.ndarray:
    """A small (3, 2) matrix on the host (a device copy, e.g. from a benchmark, comes down)."""
    host = np.asarray(m.get() if hasattr(m, "get") else m, dtype=np.float64)
    if host.shape != (3, 2) or not np.isfinite(host).all():
        raise ValueError(f"{name}: expected a finite (3, 2) stain matrix, got shape {host.shape}")
    if not (np.linalg.norm(host, axis=0) > 0).all():
        raise ValueError(f"{name}: stain columns must be non-zero, got {host.tolist()}")
    return host


def _check_pixels(x: Any, name: str, width: int, dtypes: tuple[type, ...]) -> None:
    if x.dtype not in dtypes:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name}: expected {want}, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{name}: expected shape (P, {width}), got {tuple(x.shape)}")


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam: expected a finite L1 weight >= 0, got {lam}")
    return lam


def _launchable(x: Any) -> Any:
    """Device arrays as they are (kernels read any strides); host arrays C-contiguous, since
    Numba copies a host argument to the device (or the simulator) as one buffer."""
    return x if _launch.is_device_array(x) else np.ascontiguousarray(x)


def _run(kernel: Any, n: int, *args: Any) -> None:
    """Grid-stride launch over ``n`` pixels on CuPy's current stream (see ``_launch.launch_1d``)."""
    _launch.launch_1d(kernel, n, *args)


def nn_lasso(od: Any, stain_matrix_od: Any, lam: float) -> Any:
    """Launch the per-pixel non-negative lasso (the H update); see :func:`nn_lasso_ref`.

    Parameters
    ----------
    od : (P, 3) float32 or float64 array, CuPy (device) or NumPy (simulator)
        Any strides: a CuPy view is read in place, a NumPy one copied to a contiguous buffer.
    stain_matrix_od : (3, 2) array, W
    lam : float, L1 weight >= 0

    Returns
    -------
    h : (P, 2) float64 array, same module as ``od``

    Raises
    ------
    TypeError, ValueError
        Wrong dtype or shape; non-finite matrix or zero column; negative ``lam``.
    """
    _check_pixels(od, "od", 3, _FLOATS)
    w = _host_matrix(stain_matrix_od, "stain_matrix_od")
    lam = _check_lam(lam)
    xp = _launch.device_array_module(od)
    out = xp.empty((od.shape[0], 2), dtype=np.float64)
    if od.shape[0]:
        _run(_kernels().nn_lasso, od.shape[0], _launchable(od), *w.T.ravel().tolist(), lam, out)
    return out


def vahadane_apply(
    rgb: Any,
    source_matrix: Any,
    target_matrix: Any,
    conc_scale: Any,
    *,
    lam: float,
    io_source: float,
    io_target: float,
) -> Any:
    """Launch the fused re-rendering; see :func:`vahadane_apply_ref`.

    Parameters
    ----------
    rgb : (P, 3) uint8 array, CuPy or NumPy (simulator); any strides, as in :func:`nn_lasso`
    source_matrix, target_matrix : (3, 2) arrays
        Stain vectors (columns) of the image and of the target.
    conc_scale : (2,) array
        Per-stain factor on the concentrations, e.g. ``target.max_conc / source.max_conc``.
    lam : float
        L1 weight of the concentration coding, >= 0.
    io_source, io_target : float
        Background intensities (grey levels, 0 < io <= 255) of the OD and of the rendering.

    Returns
    -------
    out : (P, 3) uint8 array, same module as ``rgb``
    """
    _check_pixels(rgb, "rgb", 3, (np.uint8,))
    src = _host_matrix(source_matrix, "source_matrix")
    tgt = _host_matrix(target_matrix, "target_matrix")
    scale = np.asarray(conc_scale.get() if hasattr(conc_scale, "get") else conc_scale, dtype=np.float64)
    if scale.shape != (2,) or not np.isfinite(scale).all():
        raise ValueError(f"conc_scale: expected 2 finite values, got {scale.tolist()}")
    lam = _check_lam(lam)
    for name, io in (("io_source", io_source), ("io_target", io_target)):
        if not 0 < io <= 255:
            raise ValueError(f"{name}: expected 0 < io <= 255 grey levels, got {io}")
    xp = _launch.device_array_module(rgb)
    out = xp.empty((rgb.shape[0], 3), dtype=np.uint8)
    if rgb.shape[0]:
        _run(
            _kernels().apply, rgb.shape[0], _launchable(rgb), *src.T.ravel().tolist(), lam,
            float(scale[0]), float(scale[1]), *tgt.T.ravel().tolist(), float(io_source), float(io_target), out,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- benchmark cases

_BENCH_SOURCE = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # Ruifrok & Johnston's H, E
_BENCH_SOURCE /= np.linalg.norm(_BENCH_SOURCE, axis=0)
_BENCH_TARGET = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])  # Macenko's reference


def _bench_od(rng: np.random.Generator, n_px: int) -> tuple[Any, ...]:
    conc = rng.uniform(0.0, 1.5, (n_px, 2)) * (rng.random((n_px, 2)) < 0.7)
    od = conc @ _BENCH_SOURCE.T + rng.normal(0.0, 0.02, (n_px, 3))
    return (od, _BENCH_SOURCE, 0.1)


def _bench_rgb(rng: np.random.Generator, n_px: int) -> tuple[Any, ...]:
    rgb = rng.integers(30, 240, (n_px, 3), dtype=np.uint8)
    return (rgb, _BENCH_SOURCE, _BENCH_TARGET, np.array([1.1, 0.9]))


def _apply_wrapper(rgb: Any, src: Any, tgt: Any, scale: Any) -> Any:
    return vahadane_apply(rgb, src, tgt, scale, lam=0.01, io_source=240.0, io_target=240.0)


def _apply_twin(rgb: Any, src: Any, tgt: Any, scale: Any) -> Any:
    return vahadane_apply_ref(rgb, src, tgt, scale, 0.01, 240.0, 240.0)


def bench_cases() -> list[_launch.BenchCase]:
    """The H update (float64 OD in, (P, 2) float64 out) and the fused apply (uint8 in and out)."""
    return [
        _launch.BenchCase(
            name="vahadane.nn_lasso",
            make_input=_bench_od,
            run=nn_lasso,
            run_twin=nn_lasso_ref,
            bytes_moved=lambda args: args[0].shape[0] * (3 * args[0].itemsize + 2 * 8),
        ),
        _launch.BenchCase(
            name="vahadane.apply",
            make_input=_bench_rgb,
            run=_apply_wrapper,
            run_twin=_apply_twin,
            bytes_moved=lambda args: args[0].shape[0] * 6,
        ),
    ]
