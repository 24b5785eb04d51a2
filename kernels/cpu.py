"""Threads of the compiled CPU kernels (the Numba ``njit(parallel=True)`` twins in this package).

Numba's thread count is a per-thread setting: a caller that runs several workers side by side,
each calling the kernels, gives each worker its share of the cores here, so the kernels of two
workers do not each start a team as large as the machine.
"""

from __future__ import annotations

import functools
import threading

__all__ = ["set_cpu_threads", "max_cpu_threads", "warm_up", "warm_up_in_background"]


def max_cpu_threads() -> int:
    """Most threads a compiled kernel may use (Numba's ``NUMBA_NUM_THREADS``, the machine's cores by default)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def set_cpu_threads(n: int) -> None:
    """Compiled kernels launched from the calling thread use ``n`` threads (clamped to [1, max_cpu_threads()])."""
    import numba

    numba.set_num_threads(max(1, min(int(n), max_cpu_threads())))


def warm_up() -> None:
    """Import Numba and load the pipeline's compiled CPU kernels from Numba's on-disk cache, on tiny arrays.

    The first compiled kernel of a process costs about 0.4 s (importing Numba, initialising LLVM),
    the others a few ms each; a caller starts this in a thread while it does other work (hashing
    a slide) so that the first tile batch does not wait for it. Safe to call again (cheap).
    """
    import numpy as np

    from .macenko import apply_cpu
    from .model_input import model_input_cpu
    from .resample import resize_cpu

    tiles = np.zeros((1, 8, 8, 3), np.uint8)
    resize_cpu(tiles, 4, 4)
    resize_cpu(tiles, 3, 3)
    apply_cpu(tiles.reshape(1, -1, 3), np.zeros((1, 2, 3)), np.ones((1, 2)), np.eye(3)[:, :2], io_in=240.0, io_out=240.0)
    model_input_cpu(tiles, scale=255.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), nchw=True, bgr=False)


@functools.cache
def warm_up_in_background() -> threading.Thread:
    """Start :func:`warm_up` in a daemon thread, once a process (later calls return the same thread). A
    failure there is left to the kernels' own calls, which raise it where the work needs them."""
    def run() -> None:
        try:
            warm_up()
        except Exception:  # noqa: BLE001, S110  the same kernels raise again, with context, where they are used
            pass

    thread = threading.Thread(target=run, name="gpupath-warm-up", daemon=True)
    thread.start()
    return thread
