"""Detections and their mapping from tile pixels to level-0 slide pixels.

:class:`Detections` is a struct of arrays (host NumPy): level-0 boxes ``x0, y0, x1, y1``
(half-open, x right, y down), ``score`` in [0, 1], ``label`` (int16 index into the model's class
names), and the level-0 origin of the tile each came from. :func:`to_global` maps per-tile
results to level-0; :func:`own_by_centre` and :func:`suppress_near_duplicates` together make a
nucleus that lies in the overlap of neighbouring tiles count once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

__all__ = ["Detections", "to_global", "own_by_centre", "suppress_near_duplicates", "dedup_overlaps"]


@dataclass(frozen=True, slots=True)
class Detections:
    """Boxes in level-0 px. Every field is an (N,) host array; an empty set has N = 0."""

    x0: np.ndarray        # float32 level-0 px, left (inclusive)
    y0: np.ndarray        # float32 level-0 px, top (inclusive)
    x1: np.ndarray        # float32 level-0 px, right (exclusive)
    y1: np.ndarray        # float32 level-0 px, bottom (exclusive)
    score: np.ndarray     # float32 in [0, 1]
    label: np.ndarray     # int16 class index
    tile_x: np.ndarray    # int64 level-0 origin of the source tile
    tile_y: np.ndarray    # int64

    @classmethod
    def empty(cls) -> Detections:
        f32, i16, i64 = np.zeros(0, np.float32), np.zeros(0, np.int16), np.zeros(0, np.int64)
        return cls(f32, f32, f32, f32, f32, i16, i64, i64)

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    @property
    def cx(self) -> np.ndarray:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> np.ndarray:
        return (self.y0 + self.y1) / 2

    def take(self, index: np.ndarray) -> Detections:
        return Detections(*(getattr(self, f.name)[index] for f in fields(self)))

    def clip_to(self, width_px: int, height_px: int) -> Detections:
        """Drop boxes centred outside the slide ``[0, width) x [0, height)`` and clip the rest to it (level-0 px)."""
        cx, cy = self.cx, self.cy
        d = self.take(np.flatnonzero((cx >= 0) & (cx < width_px) & (cy >= 0) & (cy < height_px)))
        return Detections(
            np.clip(d.x0, 0, width_px), np.clip(d.y0, 0, height_px),
            np.clip(d.x1, 0, width_px), np.clip(d.y1, 0, height_px),
            d.score, d.label, d.tile_x, d.tile_y,
        )

    @staticmethod
    def concat(parts: list[Detections]) -> Detections:
        if not parts:
            return Detections.empty()
        return Detections(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Detections)))


def to_global(tile_index: np.ndarray, cx_px: np.ndarray, cy_px: np.ndarray, radius_px: np.ndarray,
              score: np.ndarray, label: np.ndarray, tile_x: np.ndarray, tile_y: np.ndarray,
              l0_per_px: float) -> Detections:
    """Map centre + radius detections in tile px to level-0 boxes.

    ``tile_index`` indexes ``tile_x, tile_y`` (level-0 origins of the batch's tiles);
    ``l0_per_px`` is level-0 px per tile px. A tile pixel ``c`` covers ``[c, c + 1)`` so its
    level-0 position is ``origin + c * l0_per_px``, centres included.
    """
    ox = tile_x[tile_index].astype(np.float64)
    oy = tile_y[tile_index].astype(np.float64)
    gx = ox + cx_px * l0_per_px
    gy = oy + cy_px * l0_per_px
    r = radius_px * l0_per_px
    return Detections(
        x0=(gx - r).astype(np.float32), y0=(gy - r).astype(np.float32),
        x1=(gx + r).astype(np.float32), y1=(gy + r).astype(np.float32),
        score=score.astype(np.float32), label=label.astype(np.int16),
        tile_x=tile_x[tile_index].astype(np.int64), tile_y=tile_y[tile_index].astype(np.int64),
    )


def own_by_centre(det: Detections, *, stride_l0_px: int, overlap_l0_px: int, n_cols: int, n_rows: int) -> Detections:
    """Keep each detection only in the tile that owns its centre.

    Tile (col, row) with origin ``col * stride`` owns level-0 x in
    ``[origin + overlap/2, origin + stride + overlap/2)`` (the first column from -inf, the last to
    +inf), and likewise in y. These intervals partition the plane, so a nucleus seen by two
    overlapping tiles is kept by exactly one of them.
    """
    if len(det) == 0:
        return det
    half = overlap_l0_px / 2.0

    def owner(c: np.ndarray, n: int) -> np.ndarray:
        return np.clip(np.floor((c - half) / stride_l0_px), 0, n - 1).astype(np.int64)

    own_col = owner(det.cx.astype(np.float64), n_cols)
    own_row = owner(det.cy.astype(np.float64), n_rows)
    keep = (own_col * stride_l0_px == det.tile_x) & (own_row * stride_l0_px == det.tile_y)
    return det.take(np.flatnonzero(keep))


def suppress_near_duplicates(det: Detections, *, min_distance_l0_px: float) -> Detections:
    """Greedy suppression: drop a detection whose centre lies within ``min_distance_l0_px`` of a
    higher-scoring one of the same label (catches the rare pair split by rounding at an ownership
    boundary). Uses a spatial hash, O(N) expected.
    """
    n = len(det)
    if n < 2:
        return det
    cell = float(min_distance_l0_px)
    cx, cy = det.cx.astype(np.float64), det.cy.astype(np.float64)
    order = np.argsort(-det.score, kind="stable")
    gx = np.floor(cx / cell).astype(np.int64)
    gy = np.floor(cy / cell).astype(np.int64)
    buckets: dict[tuple[int, int], list[int]] = {}
    keep = np.zeros(n, bool)
    limit2 = cell * cell
    for i in order:
        bx, by = int(gx[i]), int(gy[i])
        clash = False
        for nx in (bx - 1, bx, bx + 1):
            for ny in (by - 1, by, by + 1):
                for j in buckets.get((nx, ny), ()):
                    if det.label[j] == det.label[i] and (cx[j] - cx[i]) ** 2 + (cy[j] - cy[i]) ** 2 < limit2:
                        clash = True
                        break
                if clash:
                    break
            if clash:
                break
        if not clash:
            keep[i] = True
            buckets.setdefault((bx, by), []).append(int(i))
    return det.take(np.flatnonzero(keep))


def dedup_overlaps(det: Detections, *, stride_l0_px: int, overlap_l0_px: int, n_cols: int, n_rows: int,
                   min_distance_l0_px: float) -> Detections:
    """Centre ownership, then near-duplicate suppression in the bands around ownership boundaries.

    Only detections within ``min_distance_l0_px`` of a boundary line can have a twin from the
    neighbouring tile, so the (Python-loop) suppression runs on that band alone.
    """
    det = own_by_centre(det, stride_l0_px=stride_l0_px, overlap_l0_px=overlap_l0_px, n_cols=n_cols, n_rows=n_rows)
    if len(det) < 2:
        return det
    half = overlap_l0_px / 2.0

    def near_line(c: np.ndarray) -> np.ndarray:
        off = np.mod(c - half, stride_l0_px)
        return (off < min_distance_l0_px) | (off > stride_l0_px - min_distance_l0_px)

    band = near_line(det.cx.astype(np.float64)) | near_line(det.cy.astype(np.float64))
    inner = np.flatnonzero(~band)
    edge = det.take(np.flatnonzero(band))
    edge = suppress_near_duplicates(edge, min_distance_l0_px=min_distance_l0_px)
    return Detections.concat([det.take(inner), edge])
