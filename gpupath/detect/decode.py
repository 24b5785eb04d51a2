"""Decoding model outputs into boxes in tile pixels, one code path for NumPy and CuPy.

Every engine returns its raw outputs as arrays on its device (NumPy or CuPy) keyed by the
card's output names. The decoders here find the detections on that device and bring only the
few numbers per detection to the host, in one copy, as :class:`TileBoxes` (tile px: pixel
``c`` covers ``[c, c + 1)``, x right, y down, boxes half-open).

- ``heatmap``: local maxima of a per-class centre heatmap above a threshold (a
  ``peak_window_px`` maximum filter, as in CenterNet), centre = ``(cell + offset) * stride``,
  size from a radius map or a width/height map. With a class map (``output.class_probs``) the
  heatmap has one channel (any object) and each peak takes the most probable class at its
  cell: one detection per nucleus whatever its class, so class confusion costs no duplicates.
- ``boxes``: box lists ``(N, K, 4)`` with scores ``(N, K)`` (and labels ``(N, K)``), in xyxy or
  cxcywh, in input pixels or normalised to the input size; kept where score >= threshold.

Model-input px map to tile px by the preprocessing scale (``input_px = tile_px * scale``), so a
model with a fixed input size still reports boxes on the tile it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupath._xp import array_module, ndimage_module, to_host
from gpupath.detect.card import BoxesOutput, HeatmapOutput

__all__ = ["TileBoxes", "decode_heatmap", "decode_boxes", "decode"]


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


def _require(outputs: dict[str, Any], name: str, ndim: int) -> Any:
    if name not in outputs:
        raise KeyError(f"model output {name!r} missing (got {sorted(outputs)})")
    a = outputs[name]
    if a.ndim != ndim:
        raise ValueError(f"model output {name!r} must have {ndim} dims, got shape {tuple(a.shape)}")
    return a


def decode_heatmap(outputs: dict[str, Any], spec: HeatmapOutput, *,
                   scale_yx: tuple[float, float] = (1.0, 1.0)) -> TileBoxes:
    """Peaks of a centre heatmap -> boxes in tile px.

    Parameters
    ----------
    outputs : ``spec.heatmap`` (N, C, h, w) scores in [0, 1] (C = 1 with ``spec.class_probs``,
        then (N, K, h, w) class probabilities); ``spec.size`` (N, 1, h, w) radius or
        (N, 2, h, w) width, height in input px; optional ``spec.offset`` (N, 2, h, w) centre (x, y)
        within the cell, in cells. NumPy or CuPy, all on one device.
    spec : the card's heatmap output description.
    scale_yx : model-input px per tile px along y and x.

    Returns
    -------
    TileBoxes on the host, label = heatmap channel.
    """
    heat = _require(outputs, spec.heatmap, 4)
    size = _require(outputs, spec.size, 4)
    class_probs = _require(outputs, spec.class_probs, 4) if spec.class_probs is not None else None
    if class_probs is not None and (heat.shape[1] != 1 or class_probs.shape[0] != heat.shape[0]
                                  or class_probs.shape[2:] != heat.shape[2:]):
        raise ValueError(f"with a class map the heatmap {spec.heatmap!r} must be (N, 1, h, w) and the class map "
                         f"{spec.class_probs!r} (N, C, h, w) on the same grid, got {tuple(heat.shape)} and "
                         f"{tuple(class_probs.shape)}")
    want = 1 if spec.size_kind == "radius" else 2
    if size.shape[1] != want or size.shape[2:] != heat.shape[2:]:
        raise ValueError(f"size output {spec.size!r} must be (N, {want}, {heat.shape[2]}, {heat.shape[3]}) "
                         f"for size_kind {spec.size_kind}, got {tuple(size.shape)}")
    xp = array_module(heat)
    heat = heat.astype(xp.float32, copy=False)
    k = spec.peak_window_px
    # Ties: fp16 engines round neighbouring cells to one value, and "equal to the window maximum"
    # would then keep both. A key below one part in 1e9, falling with the raster position, makes
    # every window's maximum unique (the earlier cell wins a tie) without reordering distinct fp16
    # or meaningfully distinct fp32 scores.
    h, w = heat.shape[2:]
    rank = xp.arange(h * w, dtype=xp.float64).reshape(1, 1, h, w) / max(h * w, 1)
    key = heat.astype(xp.float64) * (1.0 + 1e-9) - rank * 1e-9
    # a maximum filter over each heatmap channel; -1 outside so border peaks count
    local_max = ndimage_module(xp).maximum_filter(key, size=(1, 1, k, k), mode="constant", cval=-1.0)
    n, c, r, col = xp.nonzero((key == local_max) & (heat >= spec.threshold))
    if spec.offset is not None:
        offset = _require(outputs, spec.offset, 4)
        ox, oy = offset[n, 0, r, col].astype(xp.float64), offset[n, 1, r, col].astype(xp.float64)
    else:
        ox = oy = xp.full(n.shape, 0.5)
    cx_in = (col + ox) * spec.stride_px
    cy_in = (r + oy) * spec.stride_px
    if spec.size_kind == "radius":
        hw_in = hh_in = size[n, 0, r, col].astype(xp.float64)
    else:
        hw_in, hh_in = size[n, 0, r, col].astype(xp.float64) / 2, size[n, 1, r, col].astype(xp.float64) / 2
    score = heat[n, c, r, col].astype(xp.float64)
    if class_probs is not None:
        c = xp.argmax(class_probs[n, :, r, col], axis=1)
    sy, sx = scale_yx
    # results leave the device here, in one copy: a few numbers per detection
    found = to_host(xp.stack([n.astype(xp.float64), cx_in / sx, cy_in / sy, hw_in / sx, hh_in / sy,
                              score, c.astype(xp.float64)]))
    return TileBoxes.from_centres(tile_index=found[0].astype(np.int64), cx_px=found[1], cy_px=found[2],
                                  half_w_px=found[3], half_h_px=found[4], score=found[5], label=found[6])


def decode_boxes(outputs: dict[str, Any], spec: BoxesOutput, *, input_hw: tuple[int, int],
                 scale_yx: tuple[float, float] = (1.0, 1.0)) -> TileBoxes:
    """Box lists -> boxes in tile px.

    Parameters
    ----------
    outputs : ``spec.boxes`` (N, K, 4); ``spec.scores`` (N, K); optional ``spec.labels`` (N, K)
        class indices (any numeric dtype). NumPy or CuPy.
    spec : the card's boxes output description.
    input_hw : (height, width) of the model input, px (for normalised boxes).
    scale_yx : model-input px per tile px along y and x.

    Returns
    -------
    TileBoxes on the host; boxes with score < threshold, or empty (x1 <= x0 or y1 <= y0), dropped.
    """
    boxes = _require(outputs, spec.boxes, 3)
    scores = _require(outputs, spec.scores, 2)
    if boxes.shape[-1] != 4 or tuple(scores.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"boxes {tuple(boxes.shape)} must be (N, K, 4) and scores {tuple(scores.shape)} (N, K)")
    xp = array_module(boxes)
    b = boxes.astype(xp.float64)
    if spec.box_format == "cxcywh":
        b = xp.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                      b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], axis=-1)
    if spec.box_units == "normalized":
        h, w = input_hw
        b = b * xp.asarray([w, h, w, h], dtype=xp.float64)
    if spec.labels is not None:
        labels = _require(outputs, spec.labels, 2)
        if tuple(labels.shape) != tuple(scores.shape):
            raise ValueError(f"labels {tuple(labels.shape)} must match scores {tuple(scores.shape)}")
    else:
        labels = xp.zeros(scores.shape, xp.int16)
    keep = (scores >= spec.threshold) & (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
    n, k = xp.nonzero(keep)
    sel = b[n, k]
    sy, sx = scale_yx
    found = to_host(xp.stack([n.astype(xp.float64), sel[:, 0] / sx, sel[:, 1] / sy, sel[:, 2] / sx, sel[:, 3] / sy,
                              scores[n, k].astype(xp.float64), labels[n, k].astype(xp.float64)]))
    return TileBoxes(found[0].astype(np.int64), found[1], found[2], found[3], found[4],
                     found[5].astype(np.float32), np.rint(found[6]).astype(np.int16))


def decode(outputs: dict[str, Any], spec: HeatmapOutput | BoxesOutput, *, input_hw: tuple[int, int],
           scale_yx: tuple[float, float] = (1.0, 1.0)) -> TileBoxes:
    """Dispatch on the card's decoder."""
    if isinstance(spec, HeatmapOutput):
        return decode_heatmap(outputs, spec, scale_yx=scale_yx)
    return decode_boxes(outputs, spec, input_hw=input_hw, scale_yx=scale_yx)
