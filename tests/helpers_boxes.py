"""Shared by the de-duplication tests (tests/test_boxes.py) and the ownership-kernel tests
(tests/kernels/test_boxes_kernels.py): a 4 x 4 grid of overlapping tiles and detections as its
tiles would report them."""

from __future__ import annotations

import numpy as np

from gpupath.detect.boxes import Detections

STRIDE, SIZE, N = 448, 512, 4          # level-0 px; ownership boundaries at 32 + 448 k
ALL_TILES = frozenset((c, r) for c in range(N) for r in range(N))


def seen_by_tiles(points: np.ndarray, *, rng: np.random.Generator, jitter: float = 0.0,
                  processed: frozenset[tuple[int, int]] = ALL_TILES,
                  shift: dict[tuple[int, int], float] | None = None) -> Detections:
    """Every processed tile of the grid reports every point inside its footprint.

    ``jitter`` moves each report by a random amount; ``shift`` moves one tile's reports in x.
    """
    parts = []
    for row in range(N):
        for col in range(N):
            if (col, row) not in processed:
                continue
            ox, oy = col * STRIDE, row * STRIDE
            inside = (points[:, 0] >= ox) & (points[:, 0] < ox + SIZE) & (points[:, 1] >= oy) & (points[:, 1] < oy + SIZE)
            p = points[inside] + rng.uniform(-jitter, jitter, (int(inside.sum()), 2))
            p[:, 0] += (shift or {}).get((col, row), 0.0)
            m = len(p)
            parts.append(Detections(
                (p[:, 0] - 3).astype(np.float32), (p[:, 1] - 3).astype(np.float32),
                (p[:, 0] + 3).astype(np.float32), (p[:, 1] + 3).astype(np.float32),
                rng.uniform(0.5, 1, m).astype(np.float32), np.zeros(m, np.int16),
                np.full(m, ox, np.int64), np.full(m, oy, np.int64)))
    return Detections.concat(parts)
