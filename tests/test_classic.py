"""Classic nuclei detector: known discs found at their centres, tiles independent, error paths."""

from __future__ import annotations

import numpy as np
import pytest

from gpupath.detect.classic import RUIFROK_HE_OD, ClassicParams, detect_nuclei, hematoxylin_od
from helpers_classic import DISCS, MPP, he_tile


def test_finds_known_discs_at_their_centres() -> None:
    rng = np.random.default_rng(0)
    tiles = np.stack([he_tile(DISCS, rng), he_tile([], rng)])
    found = detect_nuclei(tiles, mpp=MPP)
    assert found.tile_index.tolist() == [0, 0, 0]  # nothing on the blank second tile
    got = np.c_[found.cx_px, found.cy_px]
    for x, y, r in DISCS:
        d = np.hypot(got[:, 0] - x, got[:, 1] - y)
        k = int(np.argmin(d))
        assert d[k] < 0.5, f"disc at ({x}, {y}) found {d[k]:.2f} px away"
        assert found.radius_px[k] == pytest.approx(r, rel=0.35)  # 3 scales over 2.5-5.5 µm: coarse radius
    assert ((found.score >= 0.5) & (found.score < 1)).all()
    assert found.cx_px.dtype == np.float64 and found.score.dtype == np.float32


def test_tiles_of_a_batch_are_independent() -> None:
    rng = np.random.default_rng(1)
    one = he_tile(DISCS[:1], rng)
    alone = detect_nuclei(one[None], mpp=MPP)
    # the same tile beside a crowded neighbour gives the same answer (no smoothing across the batch)
    crowded = he_tile([(x, y, 6.0) for x in range(10, 128, 20) for y in range(10, 128, 20)], rng)
    pair = detect_nuclei(np.stack([crowded, one]), mpp=MPP)
    mine = pair.tile_index == 1
    np.testing.assert_allclose(pair.cx_px[mine], alone.cx_px)
    np.testing.assert_allclose(pair.score[mine], alone.score)


def test_empty_batch_and_blank_tile() -> None:
    empty = detect_nuclei(np.zeros((0, 64, 64, 3), np.uint8), mpp=MPP)
    assert empty.cx_px.shape == (0,) and empty.tile_index.dtype == np.int64
    blank = detect_nuclei(np.full((1, 64, 64, 3), 240, np.uint8), mpp=MPP)
    assert blank.cx_px.shape == (0,)


def test_hematoxylin_of_pure_stains() -> None:
    od_h = 0.8 * RUIFROK_HE_OD[:, 0]
    rgb = np.clip(np.rint(240 * np.exp(-od_h) - 1), 0, 255).astype(np.uint8)[None, None]  # stain's own OD rule
    assert hematoxylin_od(rgb)[0, 0] == pytest.approx(0.8, abs=0.02)
    od_e = 0.8 * RUIFROK_HE_OD[:, 1]
    rgb = np.clip(np.rint(240 * np.exp(-od_e) - 1), 0, 255).astype(np.uint8)[None, None]
    assert abs(hematoxylin_od(rgb)[0, 0]) < 0.02


@pytest.mark.parametrize("tiles, kwargs, error, match", [
    (np.zeros((2, 8, 8), np.uint8), {"mpp": MPP}, ValueError, r"\(N, H, W, 3\)"),
    (np.zeros((1, 8, 8, 3), np.float32), {"mpp": MPP}, TypeError, "uint8"),
    (np.zeros((1, 8, 8, 3), np.uint8), {"mpp": 0.0}, ValueError, "mpp must be positive"),
])
def test_bad_input(tiles: np.ndarray, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        detect_nuclei(tiles, **kwargs)


def test_threshold_trades_recall() -> None:
    rng = np.random.default_rng(2)
    faint = [(40.0, 40.0, 7.0)]
    tile = he_tile(faint, rng)
    assert len(detect_nuclei(tile[None], mpp=MPP).cx_px) == 1
    assert len(detect_nuclei(tile[None], mpp=MPP, params=ClassicParams(threshold=5.0)).cx_px) == 0


@pytest.mark.gpu
def test_device_detection_matches_host() -> None:
    import cupy

    rng = np.random.default_rng(3)
    tiles = np.stack([he_tile(DISCS, rng), he_tile(DISCS[1:], rng)])
    host = detect_nuclei(tiles, mpp=MPP)
    dev = detect_nuclei(cupy.asarray(tiles), mpp=MPP)
    np.testing.assert_array_equal(host.tile_index, dev.tile_index)
    np.testing.assert_allclose(dev.cx_px, host.cx_px, atol=1e-3)  # float32 filters, other summation order
    np.testing.assert_allclose(dev.score, host.score, atol=1e-4)
