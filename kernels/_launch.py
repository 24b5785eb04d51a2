"""Shared launch helpers for the Numba CUDA kernels.

Kernels are written with grid-stride loops, so any grid covers any size; :func:`grid_1d` picks a
grid that fills a GPU without launching more blocks than there is work. Under the CUDA simulator
(CI) each thread is a Python thread, so launches there use a tiny grid.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["simulator_enabled", "grid_1d", "launch_1d", "kernel_args", "current_stream", "cuda", "is_device_array",
           "device_array_module", "to_host", "od_table", "BenchCase"]

THREADS_PER_BLOCK = 256
_SIM_BLOCKS, _SIM_THREADS = 2, 8  # simulator: every CUDA thread is a Python thread


def simulator_enabled() -> bool:
    """True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` before numba is imported)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


@functools.cache
def cuda() -> Any:
    """``numba.cuda``, imported on first use (never at import time of a kernel module)."""
    from numba import cuda as numba_cuda

    return numba_cuda


def grid_1d(n: int) -> tuple[int, int]:
    """(blocks, threads per block) for a grid-stride loop over ``n`` items."""
    if simulator_enabled():
        return _SIM_BLOCKS, _SIM_THREADS
    blocks = max(1, min(-(-n // THREADS_PER_BLOCK), 65535))
    return blocks, THREADS_PER_BLOCK


def current_stream(*arrays: Any) -> Any:
    """Numba view of CuPy's current stream when any array is on the device (kernels then run in
    order with CuPy's work, no host wait); 0 (the default stream) otherwise, e.g. in the simulator."""
    if any(is_device_array(a) for a in arrays):
        import cupy

        return cuda().external_stream(cupy.cuda.get_current_stream().ptr)
    return 0


def launch_1d(kernel: Any, n: int, *args: Any, max_blocks: int = 65535) -> None:
    """Launch a grid-stride ``kernel(*args)`` over ``n`` items on CuPy's current stream.

    Device arrays are passed as Numba views made with ``sync=False`` (the stream that produced
    them is the one the kernel runs on, so no host synchronisation is needed).
    """
    blocks, threads = grid_1d(n)
    blocks = min(blocks, max_blocks)
    stream = current_stream(*args)
    kernel[blocks, threads, stream](*kernel_args(stream, args))


def kernel_args(stream: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Device arrays as Numba views made with ``sync=False``.

    Handing CuPy arrays to a Numba kernel as they are makes Numba synchronise on the stream each
    one names in ``__cuda_array_interface__`` (a host wait per argument per launch); the kernel
    runs on that same stream (``stream``), so ordering already holds without it.
    """
    if stream == 0:
        return args
    return tuple(cuda().as_cuda_array(a, sync=False) if is_device_array(a) else a for a in args)


def is_device_array(x: Any) -> bool:
    return hasattr(x, "__cuda_array_interface__")


def device_array_module(x: Any) -> Any:
    """CuPy for device arrays; NumPy for host arrays (simulator launches take NumPy arrays)."""
    if is_device_array(x):
        import cupy

        return cupy
    return np


def to_host(x: Any) -> np.ndarray:
    """A host NumPy copy of a device array (CuPy ``.get()``, else via CuPy); NumPy arrays as they are."""
    if is_device_array(x):
        if hasattr(x, "get"):
            return x.get()
        import cupy

        return cupy.asarray(x).get()
    return np.asarray(x)


def od_table(io: float, dtype: Any) -> np.ndarray:
    """(256,) optical density of grey levels 0..255 in ``dtype``: ln(io / (I + 1)).

    The stain stage (``gpupath.stain``) computes OD with this same expression, so a kernel that
    looks OD up in this table sees the host's values bit for bit (a test holds them equal).
    """
    return np.log(dtype(io) / (np.arange(256, dtype=np.uint8).astype(dtype) + 1))


@dataclass(frozen=True, slots=True)
class BenchCase:
    """One kernel as bench/bench_kernels.py times it against its NumPy twin.

    ``make_input(rng, n_px)`` returns the positional arguments (host NumPy arrays) for about
    ``n_px`` pixels; ``run`` is the public wrapper (device kernel on CuPy input, twin on NumPy);
    ``run_twin`` the NumPy twin; ``bytes_moved(args)`` the bytes a kernel must read + write at
    least (for the memory-bandwidth fraction on a GPU).
    """

    name: str
    make_input: Callable[[np.random.Generator, int], tuple[Any, ...]]
    run: Callable[..., Any]
    run_twin: Callable[..., Any]
    bytes_moved: Callable[[tuple[Any, ...]], int]
