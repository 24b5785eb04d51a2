"""Assertions shared by the detector-engine tests."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree


def assert_same_detections(a: Any, b: Any, *, box_px: float, score: float) -> None:
    """Every box of TileBoxes ``a`` has one in ``b`` within ``box_px`` on all four sides (and back),
    one-to-one, in the same tile, with the same label and a score within ``score``."""
    assert len(a) == len(b), f"{len(a)} vs {len(b)} detections"
    ka = np.c_[a.tile_index * 10_000.0, a.x0, a.y0, a.x1, a.y1]
    kb = np.c_[b.tile_index * 10_000.0, b.x0, b.y0, b.x1, b.y1]
    dist, idx = cKDTree(kb).query(ka, p=np.inf)
    assert (dist <= box_px).all(), f"box differs by {dist.max():.3g} px"
    assert len(set(idx.tolist())) == len(idx), "two boxes matched one"
    assert np.abs(a.score - b.score[idx]).max() <= score
    assert (a.label == b.label[idx]).all()
