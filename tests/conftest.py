"""Shared fixtures: real slides from ../shared/data, and a GPU marker that skips with a reason."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
import types
from pathlib import Path

import numpy as np
import pytest

from gpupath_kernels import _launch
from gpupath._xp import cupy_or_none, gpu_available, gpu_problem

# Device kernels: on a machine without a GPU, run them under Numba's CUDA simulator. This must be
# set before numba is first imported, hence here, at the top of the first conftest.
if not gpu_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Broad guards re-raise what is not a GpupathError (gpupath.errors.unexpected): a bug fails its test
# instead of passing as a failed slide. Subprocesses and Dask workers inherit it.
os.environ.setdefault("GPUPATH_STRICT", "1")

DATA_DIR = Path(os.environ.get("GPUPATH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# every file of the shared test data, and what it is expected to do
READABLE = ["cmu-1-small-region.svs", "OS-2-ndpi.ome.tif", "test3-DAPI.ndpi", "small.svs", "boxes.tiff",
            "boxes_0.dcm", "boxes_1.dcm", "unreadable.svs"]
UNOPENABLE = ["unopenable.tiff", "broken.svs"]


def data_file(name: str) -> Path:
    """Path of a shared test slide, or skip naming the missing file and the variable to set."""
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"test slide {path} missing: set GPUPATH_TEST_DATA to the folder of shared test slides")
    return path


def nuclei_dataset(name: str) -> Path:
    """Folder of a human-annotated nuclei dataset (../shared/data/nuclei-train/<name>), or skip."""
    path = DATA_DIR / "nuclei-train" / name
    if not (path / "meta.json").is_file():
        pytest.skip(f"annotation dataset {path} missing: set GPUPATH_TEST_DATA to the folder of shared test data")
    return path


def import_or_skip(name: str, reason: str) -> types.ModuleType:
    """Import ``name`` or skip with ``reason`` and the error: unlike pytest.importorskip, also for an
    install that is present but broken (a TensorRT whose libraries fail to load raises OSError)."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001  any failure to import means the optional path cannot run here
        pytest.skip(f"{reason} ({type(exc).__name__}: {exc})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU ({gpu_problem()})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request: pytest.FixtureRequest) -> types.ModuleType:
    """The array module a stage test runs on: NumPy always, CuPy where a GPU is present."""
    if request.param == "numpy":
        return np
    if not gpu_available():
        pytest.skip("cupy backend: no usable CUDA device (gpupath._xp.gpu_available() is False)")
    return cupy_or_none()


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
