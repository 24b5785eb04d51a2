"""Helpers shared by the kernel tests: the simulator/CuPy backend fixture and the offline PTX check."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from gpupath_kernels import _launch


@dataclass(frozen=True)
class Backend:
    name: str
    put: Callable[[np.ndarray], Any]  # host array -> the kernel's input
    get: Callable[[Any], np.ndarray]  # kernel output -> host array


@pytest.fixture(params=["sim", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Where a kernel runs: NumPy arrays under the CUDA simulator (CI), or CuPy arrays on a GPU."""
    if request.param == "sim":
        if not _launch.simulator_enabled():
            pytest.skip("CUDA simulator off (a GPU is present): the cupy case runs the kernels")
        return Backend("sim", np.asarray, np.asarray)
    cupy = pytest.importorskip("cupy")
    return Backend("cupy", cupy.asarray, cupy.asnumpy)


# Real Numba CUDA compiler (not the simulator), sm_90, no device needed: device functions are
# compiled for the current device's capability, so the device query is stubbed.
_PTX_PRELUDE = """
import os, types
os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
try:
    from numba import cuda, types as T
    from numba.cuda.cudadrv import nvvm
    nvvm.NVVM()
except Exception as exc:  # no libNVVM here: nothing to compile with
    print("NO_NVVM", exc)
    raise SystemExit(0)
import numba.cuda.dispatcher as dispatcher
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
"""


def assert_compiles_for_gpu(body: str) -> None:
    """Run ``body`` (which compiles kernels with ``cuda.compile_ptx`` and prints OK) in a fresh
    interpreter with the real CUDA compiler: type inference and PTX for sm_90, which the simulator
    (it runs kernels as Python) never checks. Skips, naming why, where libNVVM is absent."""
    script = _PTX_PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if proc.stdout.startswith("NO_NVVM"):
        pytest.skip(f"no libNVVM to compile with: {proc.stdout.strip()}")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
