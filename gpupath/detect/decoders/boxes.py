"""The ``boxes`` decoder: box lists (DETR / YOLO-after-NMS style) -> boxes in tile px.

Outputs: boxes ``(N, K, 4)`` with scores ``(N, K)`` (and labels ``(N, K)``), in xyxy or cxcywh, in
input pixels or normalised to the input size; kept where score >= threshold and the box is not empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gpupath._xp import array_module, to_host
from gpupath.detect.card_fields import choice, optional_output_name, output_name, refuse_unknown_keys, threshold
from gpupath.detect.decoders.base import Decoder, dim_ok, rank_problem, require_output
from gpupath.types import TileBoxes

__all__ = ["BoxesOutput", "decode_boxes", "DECODER"]

_KEYS = {"decoder", "boxes", "scores", "labels", "box_format", "box_units", "threshold"}


@dataclass(frozen=True, slots=True)
class BoxesOutput:
    """Box-list outputs (DETR / YOLO-after-NMS style)."""

    boxes: str
    scores: str
    labels: str | None = None
    box_format: Literal["xyxy", "cxcywh"] = "xyxy"
    box_units: Literal["pixels", "normalized"] = "pixels"
    threshold: float = 0.5
    decoder: Literal["boxes"] = "boxes"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.boxes, self.scores, self.labels) if n is not None)


def parse(card: Path, d: dict[str, Any]) -> BoxesOutput:
    """The card's ``output:`` mapping for this decoder."""
    refuse_unknown_keys(card, "output (boxes decoder)", d, _KEYS)
    boxes, scores = output_name(card, d, "boxes", "boxes"), output_name(card, d, "scores", "boxes")
    return BoxesOutput(
        boxes=boxes, scores=scores, labels=optional_output_name(card, d, "labels"),
        box_format=choice(card, "output.box_format", d.get("box_format", "xyxy"), ("xyxy", "cxcywh")),
        box_units=choice(card, "output.box_units", d.get("box_units", "pixels"), ("pixels", "normalized")),
        threshold=threshold(card, d),
    )


def check(spec: BoxesOutput, outputs: dict[str, tuple], classes: tuple[str, ...]) -> str | None:
    """The model's declared output shapes against the spec (None when they fit)."""
    problem = rank_problem("boxes", {spec.boxes: 3, spec.scores: 2, spec.labels: 2}, outputs)
    if problem:
        return problem
    if not dim_ok(outputs[spec.boxes][-1], 4):
        return f"output {spec.boxes!r} {list(outputs[spec.boxes])} must end in 4 box coordinates"
    return None


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
    boxes = require_output(outputs, spec.boxes, 3)
    scores = require_output(outputs, spec.scores, 2)
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
        labels = require_output(outputs, spec.labels, 2)
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


DECODER = Decoder(name="boxes", spec_type=BoxesOutput, parse=parse, check=check, decode=decode_boxes)
