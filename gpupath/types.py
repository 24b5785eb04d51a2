"""Value types that cross the parts of gpupath (NumPy only, no behaviour beyond their own fields).

:class:`Detections` is what detection hands to results and exports: a struct of host arrays,
level-0 boxes ``x0, y0, x1, y1`` (half-open, x right, y down), ``score`` in [0, 1], ``label``
(int16 index into the model's class names) and the level-0 origin of the tile each came from.
Results and exports import it from here, never from ``gpupath.detect``.

:class:`TileBoxes` is what a detector gives for one batch of tiles, before the boxes are placed on
the slide: tile px, with the index of each box's tile in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

__all__ = ["Detections", "TileBoxes"]


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

    def tile_cells(self, stride_l0: float) -> tuple[np.ndarray, np.ndarray]:
        """(col, row) int64 of each box's source tile in a grid of tiles every ``stride_l0`` level-0 px:
        the integer origins lie within 1 px of ``col * stride_l0`` (the one place this is computed)."""
        return (np.rint(self.tile_x / stride_l0).astype(np.int64), np.rint(self.tile_y / stride_l0).astype(np.int64))

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


@dataclass(frozen=True, slots=True)
class TileBoxes:
    """Detections of one batch in tile px, on the host. Every field is (M,)."""

    tile_index: np.ndarray   # int64 index into the batch
    x0: np.ndarray           # float64 tile px, left (inclusive)
    y0: np.ndarray           # float64 tile px, top (inclusive)
    x1: np.ndarray           # float64 tile px, right (exclusive)
    y1: np.ndarray           # float64 tile px, bottom (exclusive)
    score: np.ndarray        # float32 in [0, 1]
    label: np.ndarray        # int16 class index

    @classmethod
    def empty(cls) -> TileBoxes:
        f = np.zeros(0)
        return cls(np.zeros(0, np.int64), f, f, f, f, np.zeros(0, np.float32), np.zeros(0, np.int16))

    @classmethod
    def from_centres(cls, *, tile_index: np.ndarray, cx_px: np.ndarray, cy_px: np.ndarray, half_w_px: np.ndarray,
                     half_h_px: np.ndarray, score: np.ndarray, label: np.ndarray) -> TileBoxes:
        return cls(np.asarray(tile_index, np.int64), cx_px - half_w_px, cy_px - half_h_px, cx_px + half_w_px,
                   cy_px + half_h_px, np.asarray(score, np.float32), np.asarray(label, np.int16))

    def __len__(self) -> int:
        return int(self.x0.shape[0])
