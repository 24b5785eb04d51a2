"""Detections and their mapping from tile pixels to level-0 slide pixels.

:class:`Detections` is a struct of arrays (host NumPy): level-0 boxes ``x0, y0, x1, y1``
(half-open, x right, y down), ``score`` in [0, 1], ``label`` (int16 index into the model's class
names), and the level-0 origin of the tile each came from. :func:`boxes_to_global` maps a
detector's per-tile boxes to level-0; :func:`own_by_centre` and :func:`suppress_near_duplicates` together make a
nucleus that lies in the overlap of neighbouring tiles count once. Ownership is a Numba CUDA
kernel (``gpupath_kernels.boxes``) when the detections are CuPy arrays; the greedy suppression is
sequential by nature (each decision depends on the earlier ones) and stays on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from gpupath._xp import array_module, is_device_array
from gpupath.types import Detections
from gpupath_kernels import boxes as boxes_kernels

__all__ = ["Detections", "GridLayout", "boxes_to_global", "own_by_centre", "suppress_near_duplicates",
           "dedup_overlaps", "match_one_to_one", "random_detections"]


def boxes_to_global(boxes: Any, *, origin_x: np.ndarray, origin_y: np.ndarray, tile_x: np.ndarray,
                    tile_y: np.ndarray, l0_per_px: float) -> Detections:
    """Map a detector's :class:`~gpupath.types.TileBoxes` (tile px) to level-0 boxes.

    Parameters
    ----------
    boxes : TileBoxes of one batch (tile_index, x0, y0, x1, y1 in tile px, score, label).
    origin_x, origin_y : (N,) exact level-0 position of each tile's pixel (0, 0) corner (float).
    tile_x, tile_y : (N,) integer level-0 origins that identify the tiles.
    l0_per_px : level-0 px per tile px.
    """
    t = np.asarray(boxes.tile_index, np.int64)
    ox = np.asarray(origin_x, np.float64)[t]
    oy = np.asarray(origin_y, np.float64)[t]
    return Detections(
        x0=(ox + boxes.x0 * l0_per_px).astype(np.float32), y0=(oy + boxes.y0 * l0_per_px).astype(np.float32),
        x1=(ox + boxes.x1 * l0_per_px).astype(np.float32), y1=(oy + boxes.y1 * l0_per_px).astype(np.float32),
        score=np.asarray(boxes.score, np.float32), label=np.asarray(boxes.label, np.int16),
        tile_x=np.asarray(tile_x)[t].astype(np.int64), tile_y=np.asarray(tile_y)[t].astype(np.int64),
    )


@dataclass(frozen=True, slots=True)
class GridLayout:
    """What de-duplication needs to know of a tile grid (level-0 px, exact floats)."""

    stride_l0: float          # distance between neighbouring tile origins
    overlap_l0: float         # width shared by neighbours
    processed: np.ndarray     # (n_rows, n_cols) bool: the tiles that were read

    def __post_init__(self) -> None:
        if self.processed.ndim != 2 or self.processed.dtype != np.bool_:
            raise ValueError(f"processed: expected an (n_rows, n_cols) bool array, got {self.processed.dtype} "
                             f"{self.processed.shape}")

    @classmethod
    def from_cells(cls, *, stride_l0: float, overlap_l0: float, n_cols: int, n_rows: int, col: Any,
                   row: Any) -> GridLayout:
        """The layout of an ``n_cols`` x ``n_rows`` grid of which tiles (``col[i]``, ``row[i]``) were read."""
        processed = np.zeros((n_rows, n_cols), bool)
        processed[np.asarray(row, np.int64), np.asarray(col, np.int64)] = True
        return cls(stride_l0=stride_l0, overlap_l0=overlap_l0, processed=processed)

    @property
    def n_rows(self) -> int:
        return int(self.processed.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.processed.shape[1])


def _owner(c: np.ndarray, layout: GridLayout, n: int) -> np.ndarray:
    """Grid index owning level-0 coordinate ``c``: tile k owns ``[k*s + ov/2, (k+1)*s + ov/2)``."""
    return np.clip(np.floor((c - layout.overlap_l0 / 2) / layout.stride_l0), 0, n - 1).astype(np.int64)


def own_by_centre(det: Detections, layout: GridLayout, *, margin_l0_px: float = 0.0) -> tuple[Detections, np.ndarray]:
    """Keep each detection in the tile that owns its centre.

    Owned intervals ``[k*stride + overlap/2, (k+1)*stride + overlap/2)`` (first tile from -inf,
    last to +inf) partition the plane, so a nucleus seen by two overlapping tiles is kept once.
    Two refinements keep nuclei that the bare rule would lose:

    - a detection within ``margin_l0_px`` of its tile's owned area is kept too (two tiles may
      place one nucleus on opposite sides of a boundary); such near-boundary pairs are left to
      :func:`suppress_near_duplicates`;
    - a detection whose owner tile was not processed (too little tissue) is kept ("orphan").

    Returns
    -------
    (kept detections, bool mask over the kept ones: True where suppression must look).

    Notes
    -----
    Detections whose fields are CuPy arrays are decided by a Numba CUDA kernel
    (``gpupath_kernels.boxes``, identical masks) and stay on the device; the result's arrays and
    mask are then CuPy arrays too.
    """
    if is_device_array(det.x0):
        return _own_by_centre_device(det, layout, margin_l0_px=margin_l0_px)
    if len(det) == 0:
        return det, np.zeros(0, bool)
    col, row = det.tile_cells(layout.stride_l0)
    cx, cy = det.cx.astype(np.float64), det.cy.astype(np.float64)
    own_c, own_r = _owner(cx, layout, layout.n_cols), _owner(cy, layout, layout.n_rows)
    owned = (own_c == col) & (own_r == row)
    near = np.zeros(len(det), bool)
    if margin_l0_px > 0:
        own_c_lo, own_c_hi = (_owner(cx - margin_l0_px, layout, layout.n_cols),
                              _owner(cx + margin_l0_px, layout, layout.n_cols))
        own_r_lo, own_r_hi = (_owner(cy - margin_l0_px, layout, layout.n_rows),
                              _owner(cy + margin_l0_px, layout, layout.n_rows))
        near = (own_c_lo <= col) & (col <= own_c_hi) & (own_r_lo <= row) & (row <= own_r_hi) & ~owned
    orphan = ~layout.processed[own_r, own_c]
    keep = owned | near | orphan
    return det.take(np.flatnonzero(keep)), (near | orphan)[keep]


def _own_by_centre_device(det: Detections, layout: GridLayout, *, margin_l0_px: float) -> tuple[Detections, Any]:
    """:func:`own_by_centre` for detections held in CuPy arrays (the ownership kernel)."""
    xp = array_module(det.x0)
    if len(det) == 0:
        return det, xp.zeros(0, bool)
    col, row = det.tile_cells(layout.stride_l0)
    bitmap = layout.processed.astype(np.uint8)
    keep, look = boxes_kernels.own_by_centre(
        det.cx.astype(xp.float64), det.cy.astype(xp.float64), col, row, stride_l0=layout.stride_l0,
        overlap_l0=layout.overlap_l0, processed=xp.asarray(bitmap),  # the grid's bitmap: one small upload
        margin_l0_px=margin_l0_px)
    index = xp.flatnonzero(keep)
    return det.take(index), look[index]


def suppress_near_duplicates(det: Detections, *, min_distance_l0_px: float, any_label: bool = False) -> Detections:
    """Greedy suppression, best score first: drop a detection whose centre lies within
    ``min_distance_l0_px`` of a kept one of the same label (of any label with ``any_label``)."""
    n = len(det)
    if n < 2:
        return det
    pairs = cKDTree(np.c_[det.cx, det.cy]).query_pairs(min_distance_l0_px, output_type="ndarray")
    if not any_label:
        pairs = pairs[det.label[pairs[:, 0]] == det.label[pairs[:, 1]]]
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in pairs.tolist():
        neighbours[i].append(j)
        neighbours[j].append(i)
    suppressed = np.zeros(n, bool)
    keep = []
    for i in np.argsort(-det.score, kind="stable").tolist():
        if not suppressed[i]:
            keep.append(i)
            suppressed[neighbours[i]] = True
    return det.take(np.sort(np.array(keep, np.int64)))


def dedup_overlaps(det: Detections, layout: GridLayout, *, min_distance_l0_px: float,
                   any_label: bool = False) -> Detections:
    """Each object once: centre ownership (with a boundary margin and orphans), then suppression of
    near duplicates among the detections near a boundary or orphaned.

    Only those can have a twin from a neighbouring tile, so the suppression pass (a Python loop
    over pairs) runs on them alone.
    """
    kept, look = own_by_centre(det, layout, margin_l0_px=min_distance_l0_px)
    if len(kept) < 2:
        return kept
    half = layout.overlap_l0 / 2

    band = 2 * min_distance_l0_px  # a pair straddling a line: each within one distance of the other

    def near_line(c: np.ndarray) -> np.ndarray:
        off = np.mod(c - half, layout.stride_l0)
        return (off < band) | (off > layout.stride_l0 - band)

    look |= near_line(kept.cx.astype(np.float64)) | near_line(kept.cy.astype(np.float64))
    edge = suppress_near_duplicates(kept.take(np.flatnonzero(look)), min_distance_l0_px=min_distance_l0_px,
                                    any_label=any_label)
    return Detections.concat([kept.take(np.flatnonzero(~look)), edge])


def match_one_to_one(a: np.ndarray, b: np.ndarray, max_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of two point sets, closest pairs first.

    Parameters
    ----------
    a, b : (N, 2) and (M, 2) points, px (e.g. box centres, level-0).
    max_px : largest distance of a matched pair, px.

    Returns
    -------
    (index into ``a``, index into ``b``) of the matched pairs, int64, in the order they were taken
    (increasing distance; ties by index). Empty when either set is.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.sort(cKDTree(a).sparse_distance_matrix(cKDTree(b), max_px, output_type="ndarray"), order="v")
    used_a, used_b = np.zeros(len(a), bool), np.zeros(len(b), bool)
    ia: list[int] = []
    ib: list[int] = []
    for i, j, _ in pairs.tolist():
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            ia.append(i)
            ib.append(j)
    return np.asarray(ia, np.int64), np.asarray(ib, np.int64)


def random_detections(n: int, rng: np.random.Generator, *, side_px: int, n_labels: int,
                      stride_px: int) -> Detections:
    """``n`` boxes (radius 3-10 px) with uniform random centres on a ``side_px`` square slide, each
    assigned to the tile (origins every ``stride_px`` level-0 px) holding its centre, as the pipeline's
    de-duplication leaves them; random scores and labels in ``0..n_labels-1``. For query tests and
    benchmarks at sizes no slide run reaches quickly."""
    cx, cy = rng.uniform(0, side_px, n).astype(np.float32), rng.uniform(0, side_px, n).astype(np.float32)
    r = rng.uniform(3, 10, n).astype(np.float32)
    tx = (np.floor(cx / stride_px) * stride_px).astype(np.int64)
    ty = (np.floor(cy / stride_px) * stride_px).astype(np.int64)
    return Detections(np.clip(cx - r, 0, side_px), np.clip(cy - r, 0, side_px), np.clip(cx + r, 0, side_px),
                      np.clip(cy + r, 0, side_px), rng.uniform(0, 1, n).astype(np.float32),
                      rng.integers(0, n_labels, n).astype(np.int16), tx, ty)
