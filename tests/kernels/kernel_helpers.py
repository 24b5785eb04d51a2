"""Helpers shared by the kernel tests: the offline PTX check (the ``backend`` fixture is in tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest



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
