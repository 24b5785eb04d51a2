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
    "device_module",
]


@functools.cache
def cupy_or_none() -> types.ModuleType | None:
    """CuPy if it imports *and* a CUDA device answers, else None (never raises)."""
    try:
        import cupy  # noqa: PLC0415  (optional dependency)

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # noqa: BLE001  no CuPy, no driver or no device: all mean "host only"
        return None


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return cupy_or_none() is not None


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
        import scipy.ndimage  # noqa: PLC0415

        return scipy.ndimage
    import cupyx.scipy.ndimage  # noqa: PLC0415

    return cupyx.scipy.ndimage


def device_module(device: str) -> types.ModuleType:
    """NumPy for ``device="cpu"``, CuPy for ``"cuda"`` (RuntimeError when no GPU is usable)."""
    if device == "cpu":
        return np
    if device != "cuda":
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    cp = cupy_or_none()
    if cp is None:
        raise RuntimeError("device 'cuda' asked for, but CuPy or a CUDA device is missing")
    return cp


def to_host(x: Any) -> np.ndarray:
    """Copy a device array to the host (no-op for NumPy arrays)."""
    if is_device_array(x):
        return x.get() if hasattr(x, "get") else np.asarray(cupy_or_none().asarray(x).get())
    return np.asarray(x)


def to_device(x: Any) -> Any:
    """Copy a host array to the current CUDA device; raises if there is none."""
    return device_module("cuda").asarray(x)
