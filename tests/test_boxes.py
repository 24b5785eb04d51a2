"""Level-0 mapping and overlap de-duplication of detections."""

from __future__ import annotations

import numpy as np
import pytest

from gpupath.detect.boxes import Detections, GridLayout, boxes_to_global, dedup_overlaps, suppress_near_duplicates
from gpupath.types import TileBoxes
from helpers_boxes import ALL_TILES, N, SIZE, STRIDE, seen_by_tiles


def layout(processed: frozenset[tuple[int, int]] = ALL_TILES) -> GridLayout:
    cells = sorted(processed)
    return GridLayout.from_cells(stride_l0=STRIDE, overlap_l0=SIZE - STRIDE, n_cols=N, n_rows=N,
                                 col=[c for c, _ in cells], row=[r for _, r in cells])


def test_boxes_to_global_maps_tile_px_to_level0() -> None:
    r = np.array([4.0, 2.0])
    boxes = TileBoxes.from_centres(tile_index=np.array([0, 1]), cx_px=np.array([10.5, 0.0]), cy_px=np.array([20.5, 5.0]),
                                   half_w_px=r, half_h_px=r, score=np.array([0.9, 0.5]), label=np.zeros(2, np.int16))
    det = boxes_to_global(boxes, origin_x=np.array([1000.0, 2000.5]), origin_y=np.array([0.0, 512.25]),
                          tile_x=np.array([1000, 2001]), tile_y=np.array([0, 513]), l0_per_px=2.0)
    np.testing.assert_allclose(det.cx, [1021.0, 2000.5])
    np.testing.assert_allclose(det.cy, [41.0, 522.25])
    np.testing.assert_allclose(det.x1 - det.x0, [16.0, 8.0])
    assert det.tile_x.tolist() == [1000, 2001]


def assert_each_once(kept: Detections, points: np.ndarray, tol_px: float = 1.0) -> None:
    assert len(kept) == len(points)
    d = np.hypot(kept.cx[:, None] - points[None, :, 0], kept.cy[:, None] - points[None, :, 1])
    assert (d.min(axis=0) < tol_px).all()


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_each_point_counted_once_across_overlaps(jitter: float) -> None:
    rng = np.random.default_rng(1)
    # a lattice 20 px apart plus a point 0.3 px from every ownership boundary (x and y), all points
    # further apart than the suppression distance
    xs = np.arange(5.0, STRIDE * (N - 1) + SIZE - 5, 20.0)
    lines = 32.0 + STRIDE * np.arange(1, N)
    xs = xs[np.abs(xs[:, None] - lines[None, :]).min(axis=1) > 6]
    xs = np.sort(np.concatenate([xs, lines - 0.3]))
    points = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    seen = seen_by_tiles(points, rng=rng, jitter=jitter)
    assert len(seen) > len(points)  # overlaps saw some points two or four times
    assert_each_once(dedup_overlaps(seen, layout(), min_distance_l0_px=5.0), points)


def test_copies_on_opposite_sides_of_a_boundary_keep_one() -> None:
    # the boundary between tiles (0, 0) and (1, 0) is x = 480: tile (0, 0) sees the nucleus at
    # 480.2 (in its neighbour's area), tile (1, 0) at 479.8 (in tile (0, 0)'s area)
    points = np.array([[480.0, 200.0]])
    seen = seen_by_tiles(points, rng=np.random.default_rng(0), shift={(0, 0): 0.2, (1, 0): -0.2})
    assert len(seen) == 2
    assert_each_once(dedup_overlaps(seen, layout(), min_distance_l0_px=5.0), points)


def test_nucleus_owned_by_an_unprocessed_tile_is_kept() -> None:
    # tile (1, 0) held too little tissue and was not read; its neighbours saw the nuclei in the overlaps
    points = np.array([[460.0, 100.0], [900.0, 100.0], [700.0, 470.0]])
    processed = ALL_TILES - {(1, 0)}
    seen = seen_by_tiles(points, rng=np.random.default_rng(0), processed=processed)
    kept = dedup_overlaps(seen, layout(processed), min_distance_l0_px=5.0)
    assert_each_once(kept, points)


def test_suppression_keeps_higher_score_of_same_label() -> None:
    f = np.float32
    det = Detections(np.array([0, 1, 100, 0], f), np.array([0, 1, 100, 0], f), np.array([6, 7, 106, 6], f),
                     np.array([6, 7, 106, 6], f), np.array([0.6, 0.9, 0.7, 0.5], f), np.array([0, 0, 0, 1], np.int16),
                     np.zeros(4, np.int64), np.zeros(4, np.int64))
    kept = suppress_near_duplicates(det, min_distance_l0_px=3.0)
    assert sorted(zip(kept.score.tolist(), kept.label.tolist())) == [(0.5, 1), (pytest.approx(0.7), 0),
                                                                     (pytest.approx(0.9), 0)]


def test_empty_detections_have_defined_shape() -> None:
    empty = Detections.empty()
    assert len(empty) == 0 and empty.x0.dtype == np.float32 and empty.tile_x.dtype == np.int64
    assert len(dedup_overlaps(empty, layout(), min_distance_l0_px=1.0)) == 0


def test_twins_with_different_labels_merge_only_with_any_label() -> None:
    # one nucleus on the line between tiles (0, 0) and (1, 0) (stride 480, overlap 32): tile 0 calls it
    # label 0, tile 1 label 1, 1 px apart; with any_label (learned detectors) it is one detection
    layout = GridLayout(stride_l0=480.0, overlap_l0=32.0, processed=np.ones((1, 2), bool))
    det = Detections(x0=np.array([490.0, 491.0]), y0=np.array([100.0, 100.0]), x1=np.array([500.0, 501.0]),
                     y1=np.array([110.0, 110.0]), score=np.array([0.9, 0.8], np.float32),
                     label=np.array([0, 1], np.int16), tile_x=np.array([0, 480]), tile_y=np.array([0, 0]))
    assert len(dedup_overlaps(det, layout, min_distance_l0_px=5.0, any_label=True)) == 1
    assert len(dedup_overlaps(det, layout, min_distance_l0_px=5.0)) == 2
