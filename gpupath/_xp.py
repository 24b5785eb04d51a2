"""Array-module dispatch: one code path for NumPy (host) and CuPy (device).

Stage functions call ``xp = array_module(x)`` and write their maths once. Transfers between
host and device are explicit (:func:`to_host`, :func:`to_device`) so a reader can find every
copy by grepping for them.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import numpy as np

__all__ = [
    "array_module",
    "ndimage_module",
    "to_host",
    "to_device",
    "is_device_array",
    "cupy_or_none",
    "gpu_available",
    "gpu_problem",
    "device_module",
]


@functools.cache
def cupy_or_none() -> types.ModuleType | None:
    """CuPy if it imports, a CUDA device answers and CuPy can run a kernel on it, else None (never raises)."""
    return _cupy_and_problem()[0]


@functools.cache
def _cupy_and_problem() -> tuple[types.ModuleType | None, str]:
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001  no CuPy (or a broken install): host only
        return None, f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy finds no CUDA device"
        # a device count alone does not prove a working stack: run one kernel (NVRTC compiles it)
        if int((cupy.arange(4, dtype=cupy.int32) + 1).sum()) != 10:
            return None, "CuPy's test kernel gave a wrong sum"
    except Exception as exc:  # noqa: BLE001  no driver, no device, no NVRTC: all mean "host only"
        return None, f"CuPy cannot use a CUDA device ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return cupy, ""


@functools.cache
def gpu_problem() -> str:
    """Why the GPU paths cannot run here ("" when they can): CuPy must run a kernel on a device and
    numba-cuda must compile and launch one (the device kernels in ``kernels/`` are Numba kernels)."""
    cp, problem = _cupy_and_problem()
    if cp is None:
        return problem
    try:
        from numba import cuda

        @cuda.jit
        def _add_one(x: Any) -> None:  # pragma: no cover - runs on the device
            i = cuda.grid(1)
            if i < x.size:
                x[i] += 1

        x = cp.zeros(4, cp.int32)
        _add_one[1, 32](x)
        if not np.array_equal(cp.asnumpy(x), np.ones(4, np.int32)):
            return "numba-cuda's test kernel gave wrong values"
    except Exception as exc:  # noqa: BLE001  no numba-cuda, no libNVVM, a PTX the driver refuses ...
        return f"numba-cuda cannot launch a kernel ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return ""


def gpu_available() -> bool:
    """True when the GPU paths can run: see :func:`gpu_problem`."""
    return not gpu_problem()


def is_device_array(x: Any) -> bool:
    """True for arrays that live in CUDA memory (CuPy or anything with the CUDA interface)."""
    return hasattr(x, "__cuda_array_interface__")


def array_module(x: Any) -> types.ModuleType:
    """NumPy for host arrays, CuPy for device arrays."""
    if is_device_array(x):
        cp = cupy_or_none()
        if cp is None:  # a device array without CuPy cannot happen in practice
            raise TypeError(f"device array of type {type(x).__name__} but CuPy is unusable")
        return cp
    return np


def ndimage_module(xp: types.ModuleType) -> types.ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy."""
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


def device_module(device: str) -> types.ModuleType:
    """NumPy for ``device="cpu"``, CuPy for ``"cuda"`` (RuntimeError when no GPU is usable)."""
    if device == "cpu":
        return np
    if device != "cuda":
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    cp = cupy_or_none()
    if cp is None:
        raise RuntimeError(f"device 'cuda' asked for, but CuPy or a CUDA device is missing ({gpu_problem()})")
    return cp


def to_host(x: Any) -> np.ndarray:
    """Copy a device array to the host (no-op for NumPy arrays)."""
    if is_device_array(x):
        return x.get() if hasattr(x, "get") else np.asarray(cupy_or_none().asarray(x).get())
    return np.asarray(x)


def to_device(x: Any) -> Any:
    """Copy a host array to the current CUDA device; raises if there is none."""
    return device_module("cuda").asarray(x)
