"""The ``heatmap`` decoder: local maxima of a centre heatmap (CenterNet, Zhou et al. 2019, "Objects
as Points") -> boxes in tile px.

Peaks are local maxima above a threshold under a ``peak_window_px`` maximum filter; the centre is
``(cell + offset) * stride``; the size comes from a radius map or a width/height map. With a class
map (``output.class_probs``) the heatmap has one channel (any object) and each peak takes the most
probable class at its cell: one detection per nucleus whatever its class, so class confusion costs
no duplicates. Without one, each heatmap channel is a class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gpupath._xp import array_module, ndimage_module, to_host
from gpupath.detect.card_fields import (
    card_error,
    choice,
    optional_output_name,
    output_name,
    refuse_unknown_keys,
    threshold,
)
from gpupath.detect.decoders.base import Decoder, dim_ok, rank_problem, require_output
from gpupath.types import TileBoxes

__all__ = ["HeatmapOutput", "decode_heatmap", "DECODER"]

_KEYS = {"decoder", "heatmap", "class_probs", "size", "size_kind", "offset", "stride_px", "peak_window_px",
         "threshold"}


@dataclass(frozen=True, slots=True)
class HeatmapOutput:
    """Centre-heatmap outputs (CenterNet-style)."""

    heatmap: str
    size: str
    size_kind: Literal["radius", "wh"] = "radius"
    offset: str | None = None
    stride_px: int = 1                            # input px per heatmap px
    peak_window_px: int = 3
    threshold: float = 0.5
    decoder: Literal["heatmap"] = "heatmap"
    class_probs: str | None = None  # (N, C, h, w) class probabilities or logits (only the argmax is read)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.heatmap, self.class_probs, self.size, self.offset) if n is not None)


def parse(card: Path, d: dict[str, Any]) -> HeatmapOutput:
    """The card's ``output:`` mapping for this decoder."""
    refuse_unknown_keys(card, "output (heatmap decoder)", d, _KEYS)
    heatmap, size = output_name(card, d, "heatmap", "heatmap"), output_name(card, d, "size", "heatmap")
    stride, window = d.get("stride_px", 1), d.get("peak_window_px", 3)
    if not (isinstance(stride, int) and stride >= 1):
        raise card_error(card, f"output.stride_px must be an int >= 1, got {stride!r}")
    if not (isinstance(window, int) and window >= 1 and window % 2 == 1):
        raise card_error(card, f"output.peak_window_px must be an odd int >= 1, got {window!r}")
    return HeatmapOutput(
        heatmap=heatmap, size=size, offset=d.get("offset"), stride_px=stride, peak_window_px=window,
        class_probs=optional_output_name(card, d, "class_probs", " (class probabilities)"),
        size_kind=choice(card, "output.size_kind", d.get("size_kind", "radius"), ("radius", "wh")),
        threshold=threshold(card, d),
    )


def check(spec: HeatmapOutput, outputs: dict[str, tuple], classes: tuple[str, ...]) -> str | None:
    """The model's declared output shapes against the spec (None when they fit)."""
    problem = rank_problem("heatmap", {spec.heatmap: 4, spec.size: 4, spec.offset: 4, spec.class_probs: 4}, outputs)
    if problem:
        return problem
    heat, n_classes, listed = outputs[spec.heatmap], len(classes), ", ".join(classes)
    if spec.offset is not None and not dim_ok(outputs[spec.offset][1], 2):
        return f"output {spec.offset!r} {list(outputs[spec.offset])} must have 2 channels (x, y)"
    if spec.class_probs is None:
        if not dim_ok(heat[1], n_classes):
            return f"heatmap {spec.heatmap!r} {list(heat)} needs one channel per class ({n_classes}: {listed})"
        return None
    if not dim_ok(heat[1], 1):
        return (f"heatmap {spec.heatmap!r} {list(heat)} must have 1 channel when the card names class "
                f"probabilities ({spec.class_probs!r})")
    if not dim_ok(outputs[spec.class_probs][1], n_classes):
        return (f"class probabilities {spec.class_probs!r} {list(outputs[spec.class_probs])} need one channel per "
                f"class ({n_classes}: {listed})")
    return None


def _check_arrays(heat: Any, size: Any, class_probs: Any, spec: HeatmapOutput) -> None:
    if class_probs is not None and (heat.shape[1] != 1 or class_probs.shape[0] != heat.shape[0]
                                  or class_probs.shape[2:] != heat.shape[2:]):
        raise ValueError(f"with a class map the heatmap {spec.heatmap!r} must be (N, 1, h, w) and the class map "
                         f"{spec.class_probs!r} (N, C, h, w) on the same grid, got {tuple(heat.shape)} and "
                         f"{tuple(class_probs.shape)}")
    want = 1 if spec.size_kind == "radius" else 2
    if size.shape[1] != want or size.shape[2:] != heat.shape[2:]:
        raise ValueError(f"size output {spec.size!r} must be (N, {want}, {heat.shape[2]}, {heat.shape[3]}) "
                         f"for size_kind {spec.size_kind}, got {tuple(size.shape)}")


def _peaks(heat: Any, spec: HeatmapOutput) -> tuple[Any, Any, Any, Any]:
    """(n, channel, row, col) of the heatmap's local maxima at or above the threshold."""
    xp = array_module(heat)
    # Ties: fp16 engines round neighbouring cells to one value, and "equal to the window maximum"
    # would then keep both. A key below one part in 1e9, falling with the raster position, makes
    # every window's maximum unique (the earlier cell wins a tie) without reordering distinct fp16
    # or meaningfully distinct fp32 scores.
    h, w = heat.shape[2:]
    rank = xp.arange(h * w, dtype=xp.float64).reshape(1, 1, h, w) / max(h * w, 1)
    key = heat.astype(xp.float64) * (1.0 + 1e-9) - rank * 1e-9
    # a maximum filter over each heatmap channel; -1 outside so border peaks count
    k = spec.peak_window_px
    local_max = ndimage_module(xp).maximum_filter(key, size=(1, 1, k, k), mode="constant", cval=-1.0)
    return xp.nonzero((key == local_max) & (heat >= spec.threshold))


def decode_heatmap(outputs: dict[str, Any], spec: HeatmapOutput, *, input_hw: tuple[int, int] | None = None,
                   scale_yx: tuple[float, float] = (1.0, 1.0)) -> TileBoxes:
    """Peaks of a centre heatmap -> boxes in tile px.

    Parameters
    ----------
    outputs : ``spec.heatmap`` (N, C, h, w) scores in [0, 1] (C = 1 with ``spec.class_probs``,
        then (N, K, h, w) class probabilities); ``spec.size`` (N, 1, h, w) radius or
        (N, 2, h, w) width, height in input px; optional ``spec.offset`` (N, 2, h, w) centre (x, y)
        within the cell, in cells. NumPy or CuPy, all on one device.
    spec : the card's heatmap output description.
    input_hw : unused (the grid comes from the outputs); the registry's common signature.
    scale_yx : model-input px per tile px along y and x.

    Returns
    -------
    TileBoxes on the host, label = heatmap channel (or the class map's argmax).
    """
    heat = require_output(outputs, spec.heatmap, 4)
    size = require_output(outputs, spec.size, 4)
    class_probs = require_output(outputs, spec.class_probs, 4) if spec.class_probs is not None else None
    _check_arrays(heat, size, class_probs, spec)
    xp = array_module(heat)
    heat = heat.astype(xp.float32, copy=False)
    n, c, r, col = _peaks(heat, spec)
    if spec.offset is not None:
        offset = require_output(outputs, spec.offset, 4)
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


DECODER = Decoder(name="heatmap", spec_type=HeatmapOutput, parse=parse, check=check, decode=decode_heatmap)
