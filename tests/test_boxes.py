"""Level-0 mapping and overlap de-duplication of detections."""

from __future__ import annotations

import numpy as np
import pytest

from gpupath.detect.boxes import Detections, dedup_overlaps, own_by_centre, suppress_near_duplicates, to_global


def test_to_global_maps_tile_px_to_level0() -> None:
    det = to_global(np.array([0, 1]), np.array([10.5, 0.0]), np.array([20.5, 5.0]), np.array([4.0, 2.0]),
                    np.array([0.9, 0.5]), np.zeros(2, np.int16), np.array([1000, 2000]), np.array([0, 512]),
                    l0_per_px=2.0)
    np.testing.assert_allclose(det.cx, [1021.0, 2000.0])
    np.testing.assert_allclose(det.cy, [41.0, 522.0])
    np.testing.assert_allclose(det.x1 - det.x0, [16.0, 8.0])
    assert det.tile_x.tolist() == [1000, 2000]


def _seen_by_tiles(points: np.ndarray, stride: int, size: int, n: int, jitter: float,
                   rng: np.random.Generator) -> Detections:
    """Every tile of an n x n grid reports every point inside it (with per-tile centre jitter)."""
    parts = []
    for row in range(n):
        for col in range(n):
            ox, oy = col * stride, row * stride
            inside = (points[:, 0] >= ox) & (points[:, 0] < ox + size) & (points[:, 1] >= oy) & (points[:, 1] < oy + size)
            p = points[inside] + rng.uniform(-jitter, jitter, (int(inside.sum()), 2))
            m = len(p)
            parts.append(Detections(
                (p[:, 0] - 3).astype(np.float32), (p[:, 1] - 3).astype(np.float32),
                (p[:, 0] + 3).astype(np.float32), (p[:, 1] + 3).astype(np.float32),
                rng.uniform(0.5, 1, m).astype(np.float32), np.zeros(m, np.int16),
                np.full(m, ox, np.int64), np.full(m, oy, np.int64)))
    return Detections.concat(parts)


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_each_point_counted_once_across_overlaps(jitter: float) -> None:
    rng = np.random.default_rng(1)
    stride, size, n = 448, 512, 4
    # points on a lattice 20 px apart, many of them in overlaps and on ownership boundaries
    xs = np.arange(5.0, stride * (n - 1) + size - 5, 20.0)
    points = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    seen = _seen_by_tiles(points, stride, size, n, jitter, rng)
    assert len(seen) > len(points)  # overlaps saw some points twice or four times
    kept = dedup_overlaps(seen, stride_l0_px=stride, overlap_l0_px=size - stride, n_cols=n, n_rows=n,
                          min_distance_l0_px=5.0)
    assert len(kept) == len(points)
    d = np.hypot(kept.cx[:, None] - points[None, :, 0], kept.cy[:, None] - points[None, :, 1]).min(1)
    assert d.max() < 1.0


def test_ownership_alone_partitions_identical_centres() -> None:
    rng = np.random.default_rng(2)
    points = rng.uniform(0, 1400, (500, 2))
    seen = _seen_by_tiles(points, 448, 512, 4, 0.0, rng)
    kept = own_by_centre(seen, stride_l0_px=448, overlap_l0_px=64, n_cols=4, n_rows=4)
    assert len(kept) == len(points)


def test_suppression_keeps_higher_score_of_same_label() -> None:
    f = np.float32
    det = Detections(np.array([0, 1, 100], f), np.array([0, 1, 100], f), np.array([6, 7, 106], f),
                     np.array([6, 7, 106], f), np.array([0.6, 0.9, 0.7], f), np.array([0, 0, 0], np.int16),
                     np.zeros(3, np.int64), np.zeros(3, np.int64))
    kept = suppress_near_duplicates(det, min_distance_l0_px=3.0)
    assert sorted(kept.score.tolist()) == pytest.approx([0.7, 0.9])


def test_empty_detections_have_defined_shape() -> None:
    empty = Detections.empty()
    assert len(empty) == 0 and empty.x0.dtype == np.float32 and empty.tile_x.dtype == np.int64
    assert len(dedup_overlaps(empty, stride_l0_px=10, overlap_l0_px=2, n_cols=1, n_rows=1, min_distance_l0_px=1)) == 0
