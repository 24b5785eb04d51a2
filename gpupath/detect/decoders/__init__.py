"""Decoders: a model's raw outputs -> boxes in tile px, one registry keyed by the card's ``output.decoder``.

Every engine returns its raw outputs as arrays on its device (NumPy or CuPy) keyed by the card's
output names. A decoder finds the detections on that device and brings only the few numbers per
detection to the host, in one copy, as :class:`gpupath.types.TileBoxes` (tile px: pixel ``c``
covers ``[c, c + 1)``, x right, y down, boxes half-open). Model-input px map to tile px by the
preprocessing scale (``input_px = tile_px * scale``), so a model with a fixed input size still
reports boxes on the tile it was given.

A new decoder is one file here that ends in ``DECODER = Decoder(...)`` (copy :mod:`.boxes`) and
one line in :data:`DECODERS`; the card parser, the ONNX check and the detector find it by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpupath.detect.card_fields import card_error, choice
from gpupath.detect.decoders import boxes, heatmap
from gpupath.detect.decoders.base import Decoder, OutputSpec
from gpupath.detect.decoders.boxes import BoxesOutput, decode_boxes
from gpupath.detect.decoders.heatmap import HeatmapOutput, decode_heatmap
from gpupath.types import TileBoxes

__all__ = ["DECODERS", "Decoder", "OutputSpec", "HeatmapOutput", "BoxesOutput", "decode_heatmap", "decode_boxes",
           "parse_output", "check_outputs", "decode"]

DECODERS: dict[str, Decoder] = {
    heatmap.DECODER.name: heatmap.DECODER,
    boxes.DECODER.name: boxes.DECODER,
}


def _decoder_of(spec: OutputSpec) -> Decoder:
    found = DECODERS.get(spec.decoder)
    if found is None or not isinstance(spec, found.spec_type):
        raise TypeError(f"no registered decoder for {type(spec).__name__} (decoder {spec.decoder!r})")
    return found


def parse_output(card: Path, d: Any) -> OutputSpec:
    """A card's ``output:`` mapping, read by the decoder it names."""
    if not isinstance(d, dict):
        raise card_error(card, "output must be a mapping")
    name = choice(card, "output.decoder", d.get("decoder"), tuple(DECODERS))
    return DECODERS[name].parse(card, d)


def check_outputs(spec: OutputSpec, outputs: dict[str, tuple], classes: tuple[str, ...]) -> str | None:
    """What in the model's declared output shapes does not fit ``spec`` (None when they fit)."""
    return _decoder_of(spec).check(spec, outputs, classes)


def decode(outputs: dict[str, Any], spec: OutputSpec, *, input_hw: tuple[int, int],
           scale_yx: tuple[float, float] = (1.0, 1.0)) -> TileBoxes:
    """Decode an engine's outputs with the card's decoder."""
    return _decoder_of(spec).decode(outputs, spec, input_hw=input_hw, scale_yx=scale_yx)
