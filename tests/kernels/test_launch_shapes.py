"""Kernels under the simulator with a launch shape like a GPU's (several blocks, a full warp each,
a block count that is no power of two): block reductions and grid-stride loops that only the
default tiny simulator grid would leave unexercised."""

from __future__ import annotations

import numpy as np
import pytest

from gpupath_kernels import _launch
from gpupath_kernels import macenko as mk
from gpupath_kernels import vahadane as kv
from gpupath_kernels.tissue import tissue_features, tissue_features_ref


@pytest.fixture
def gpu_like_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _launch.simulator_enabled():
        pytest.skip("CUDA simulator off (a GPU is present): real launches cover this")
    monkeypatch.setattr(_launch, "_SIM_BLOCKS", 3)
    monkeypatch.setattr(_launch, "_SIM_THREADS", 32)


def test_od_stats_block_reduction(gpu_like_grid: None) -> None:
    px = np.random.default_rng(0).integers(0, 256, (2, 700, 3), dtype=np.uint8)
    np.testing.assert_allclose(mk.od_stats(px), mk.od_stats_ref(px), rtol=1e-12, atol=1e-12)


def test_tissue_features_shared_histogram(gpu_like_grid: None) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    for got, want in zip(tissue_features(rgb), tissue_features_ref(rgb)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_vahadane_coding_grid_stride(gpu_like_grid: None) -> None:
    od = np.random.default_rng(2).uniform(0, 2, (300, 3))
    w = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    np.testing.assert_allclose(kv.nn_lasso(od, w, 0.1), kv.nn_lasso_ref(od, w, 0.1), rtol=1e-12, atol=1e-12)
