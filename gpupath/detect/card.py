"""Model cards: what a detector model takes in, what it gives out, and how to decode it.

A card is a small YAML file beside an ONNX model. It fixes everything the pipeline needs to
run a model it did not train: the input tensor (name, layout, channel order, size, µm per
pixel, normalisation) and the outputs with their decoder (``heatmap``: centre heatmap + size
(+ offset) maps; ``boxes``: box list + scores (+ labels)). The shipped nuclei model has one
(``gpupath/detect/models/nuclei_v2.yaml``); bring-your-own models pass theirs with
``--model my.onnx --model-card card.yaml``.

Card format (``format: gpupath-model-card/1``)::

    name: my-detector
    model: my.onnx                 # path relative to the card (or given with --model)
    classes: [nucleus]
    input:
      name: tiles                  # ONNX input name
      layout: NCHW                 # NCHW | NHWC
      channels: RGB                # RGB | BGR
      dtype: float32               # float32 | float16
      mpp: 0.5                     # µm per input pixel the model was trained at
      size_px: null                # [height, width] for fixed-size models; null: any size
      multiple_of: 8               # height and width must be multiples of this (size_px null)
      scale: 255.0                 # x = (pixel / scale - mean) / std
      mean: [0.5, 0.5, 0.5]
      std: [0.25, 0.25, 0.25]
    output:
      decoder: heatmap             # heatmap | boxes
      # heatmap: (N, C, h, w) scores in [0, 1], one channel per class, h = H / stride_px
      heatmap: heatmap
      class_probs: classes         # optional (N, C, h, w) class probabilities: the heatmap is then one
                                   # channel (any nucleus) and a peak's label is the argmax class there
      size: size                   # (N, 1, h, w) radius in input px | (N, 2, h, w) width, height
      size_kind: radius            # radius | wh
      offset: offset               # optional (N, 2, h, w): centre = (cell + offset) * stride_px
      stride_px: 4
      peak_window_px: 3            # local-maximum window on the heatmap, heatmap px
      threshold: 0.5
      # boxes: (N, K, 4) boxes, (N, K) scores, optional (N, K) labels
      # boxes: boxes
      # box_format: xyxy           # xyxy | cxcywh
      # box_units: pixels          # pixels (input px) | normalized (0..1 of width, height)
      # scores: scores
      # labels: labels
      # threshold: 0.5

Unknown keys are refused (a typo must not silently change what is decoded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpupath.errors import ConfigError

__all__ = ["InputSpec", "HeatmapOutput", "BoxesOutput", "ModelCard", "load_card", "shipped_card",
           "SHIPPED_MODEL", "file_sha256"]

CARD_FORMAT = "gpupath-model-card/1"
MODELS_DIR = Path(__file__).parent / "models"
SHIPPED_MODEL = "nuclei_v2"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """The model input tensor and how tiles become it."""

    name: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR"] = "RGB"
    dtype: Literal["float32", "float16"] = "float32"
    mpp: float = 0.5                              # µm per input px
    size_px: tuple[int, int] | None = None        # (height, width) for fixed-size models
    multiple_of: int = 1                          # height, width multiple (when size_px is None)
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def input_hw(self, tile_px: int) -> tuple[int, int]:
        """(height, width) of the model input for square tiles of ``tile_px``."""
        return self.size_px if self.size_px is not None else (tile_px, tile_px)


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
    class_probs: str | None = None                  # (N, C, h, w) class probabilities; heatmap is then (N, 1, h, w)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.heatmap, self.class_probs, self.size, self.offset) if n is not None)


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


@dataclass(frozen=True, slots=True)
class ModelCard:
    """A validated card. ``model_path`` is absolute; ``extra`` keeps documentation keys."""

    name: str
    model_path: Path
    classes: tuple[str, ...]
    input: InputSpec
    output: HeatmapOutput | BoxesOutput
    card_path: Path | None = None
    weights_path: Path | None = None              # torch weights (.npz) of the shipped architecture
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_sha256(self) -> str:
        return file_sha256(self.model_path)

    def check_tile(self, *, tile_px: int, tile_mpp: float, mpp_tolerance: float = 0.1) -> None:
        """Raise ConfigError when tiles of ``tile_px`` at ``tile_mpp`` cannot feed this model.

        A fixed-size model sees the tile resized to ``size_px``, so what must match the card's
        ``mpp`` is the resolution after that resize: ``tile_mpp * tile_px / size_px`` per axis.
        """
        size = self.input.size_px or (tile_px, tile_px)
        seen = [tile_mpp * tile_px / edge for edge in size]  # µm per model-input px, (y, x)
        if any(abs(m / self.input.mpp - 1.0) > mpp_tolerance for m in seen):
            fits = self.input.mpp * (size[1] / tile_px)  # tile µm/px that the resize brings to the card's
            raise ConfigError(
                f"model {self.name} expects {self.input.mpp:g} µm/px input (±{mpp_tolerance:.0%}); "
                + (f"the tiles are {tile_mpp:.3g} µm/px" if self.input.size_px is None else
                   f"{tile_px}-px tiles at {tile_mpp:.3g} µm/px resized to {size[1]} x {size[0]} px give "
                   f"{seen[1]:.3g} µm/px")
                + f": use --target-mpp {fits:.4g} or --engine classic")
        m = self.input.multiple_of
        if self.input.size_px is None and tile_px % m:
            raise ConfigError(f"model {self.name} needs tile sizes that are multiples of {m} px, got --tile {tile_px}")


_DOC_KEYS = {"format", "description", "training", "metrics", "license", "version", "sha256", "weights_sha256",
             "dedup_distance_um"}
_INPUT_KEYS = {"name", "layout", "channels", "dtype", "mpp", "size_px", "multiple_of", "scale", "mean", "std"}
_HEATMAP_KEYS = {"decoder", "heatmap", "class_probs", "size", "size_kind", "offset", "stride_px", "peak_window_px",
                 "threshold"}
_BOXES_KEYS = {"decoder", "boxes", "scores", "labels", "box_format", "box_units", "threshold"}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a model or weights file (:func:`gpupath.files.sha256_file`, the slides' hash)."""
    from gpupath.files import sha256_file

    return sha256_file(path)


def _fail(card: Path, what: str) -> ConfigError:
    return ConfigError(f"{card}: {what}")


def _choice(card: Path, key: str, value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise _fail(card, f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _triple(card: Path, key: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or (positive and min(vals) <= 0):
        raise _fail(card, f"input.{key} must be 3 {'positive ' if positive else ''}numbers, got {value!r}")
    return vals  # type: ignore[return-value]


def _unknown(card: Path, section: str, got: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise _fail(card, f"unknown key(s) in {section}: {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")


def _parse_input(card: Path, d: Any) -> InputSpec:
    if not isinstance(d, dict) or "name" not in d:
        raise _fail(card, "input must be a mapping with at least a name")
    _unknown(card, "input", d, _INPUT_KEYS)
    size = d.get("size_px")
    if size is not None:
        if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise _fail(card, f"input.size_px must be [height, width] positive ints or null, got {size!r}")
        size = (int(size[0]), int(size[1]))
    mpp, multiple = d.get("mpp", 0.5), d.get("multiple_of", 1)
    if not (isinstance(mpp, int | float) and 0 < mpp <= 20):
        raise _fail(card, f"input.mpp must be µm/px in (0, 20], got {mpp!r}")
    if not (isinstance(multiple, int) and multiple >= 1):
        raise _fail(card, f"input.multiple_of must be an int >= 1, got {multiple!r}")
    scale = d.get("scale", 255.0)
    if not (isinstance(scale, int | float) and scale > 0):
        raise _fail(card, f"input.scale must be a positive number, got {scale!r}")
    return InputSpec(
        name=str(d["name"]),
        layout=_choice(card, "input.layout", d.get("layout", "NCHW"), ("NCHW", "NHWC")),
        channels=_choice(card, "input.channels", d.get("channels", "RGB"), ("RGB", "BGR")),
        dtype=_choice(card, "input.dtype", d.get("dtype", "float32"), ("float32", "float16")),
        mpp=float(mpp), size_px=size, multiple_of=multiple, scale=float(scale),
        mean=_triple(card, "mean", d.get("mean", (0, 0, 0)), positive=False),
        std=_triple(card, "std", d.get("std", (1, 1, 1)), positive=True),
    )


def _threshold(card: Path, d: dict[str, Any]) -> float:
    thr = d.get("threshold", 0.5)
    if not (isinstance(thr, int | float) and 0 <= thr <= 1):
        raise _fail(card, f"output.threshold must be in [0, 1], got {thr!r}")
    return float(thr)


def _parse_output(card: Path, d: Any) -> HeatmapOutput | BoxesOutput:
    if not isinstance(d, dict):
        raise _fail(card, "output must be a mapping")
    decoder = _choice(card, "output.decoder", d.get("decoder"), ("heatmap", "boxes"))
    if decoder == "heatmap":
        _unknown(card, "output (heatmap decoder)", d, _HEATMAP_KEYS)
        for key in ("heatmap", "size"):
            if not isinstance(d.get(key), str):
                raise _fail(card, f"output.{key} must name an ONNX output for the heatmap decoder")
        stride, window = d.get("stride_px", 1), d.get("peak_window_px", 3)
        if not (isinstance(stride, int) and stride >= 1):
            raise _fail(card, f"output.stride_px must be an int >= 1, got {stride!r}")
        if not (isinstance(window, int) and window >= 1 and window % 2 == 1):
            raise _fail(card, f"output.peak_window_px must be an odd int >= 1, got {window!r}")
        class_probs = d.get("class_probs")
        if class_probs is not None and not isinstance(class_probs, str):
            raise _fail(card, f"output.class_probs must name an ONNX output (class probabilities) or be absent, "
                              f"got {class_probs!r}")
        return HeatmapOutput(
            heatmap=d["heatmap"], size=d["size"], offset=d.get("offset"), stride_px=stride, peak_window_px=window,
            class_probs=class_probs,
            size_kind=_choice(card, "output.size_kind", d.get("size_kind", "radius"), ("radius", "wh")),
            threshold=_threshold(card, d),
        )
    _unknown(card, "output (boxes decoder)", d, _BOXES_KEYS)
    for key in ("boxes", "scores"):
        if not isinstance(d.get(key), str):
            raise _fail(card, f"output.{key} must name an ONNX output for the boxes decoder")
    labels = d.get("labels")
    if labels is not None and not isinstance(labels, str):
        raise _fail(card, f"output.labels must name an ONNX output or be absent, got {labels!r}")
    return BoxesOutput(
        boxes=d["boxes"], scores=d["scores"], labels=labels,
        box_format=_choice(card, "output.box_format", d.get("box_format", "xyxy"), ("xyxy", "cxcywh")),
        box_units=_choice(card, "output.box_units", d.get("box_units", "pixels"), ("pixels", "normalized")),
        threshold=_threshold(card, d),
    )


def load_card(card_path: str | Path, *, model_path: str | Path | None = None) -> ModelCard:
    """Read and validate a model card.

    Parameters
    ----------
    card_path : YAML card.
    model_path : the ONNX file; default: the card's ``model`` key, relative to the card.

    Raises
    ------
    ConfigError
        Unreadable YAML, unknown or missing keys, values out of range, model file missing.
    """
    import yaml

    card = Path(card_path)
    try:
        raw = yaml.safe_load(card.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{card}: model card not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{card}: not a readable YAML model card ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise _fail(card, "a model card is a YAML mapping")
    if raw.get("format", CARD_FORMAT) != CARD_FORMAT:
        raise _fail(card, f"format must be {CARD_FORMAT}, got {raw.get('format')!r}")
    _unknown(card, "the card", raw, _DOC_KEYS | {"name", "model", "weights", "classes", "input", "output"})
    classes = raw.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise _fail(card, f"classes must be a non-empty list of names, got {classes!r}")
    if model_path is None:
        if not isinstance(raw.get("model"), str):
            raise _fail(card, "no model file: give `model:` in the card or --model")
        model_path = card.parent / raw["model"]
    model = Path(model_path)
    if not model.is_file():
        raise ConfigError(f"{model}: model file not found (card {card})")
    weights = raw.get("weights")
    dedup = raw.get("dedup_distance_um", 2.5)
    if not (isinstance(dedup, int | float) and not isinstance(dedup, bool) and 0 < dedup <= 1000):
        raise _fail(card, f"dedup_distance_um must be a number of µm in (0, 1000], got {dedup!r}")
    return ModelCard(
        name=str(raw.get("name", model.stem)),
        model_path=model.resolve(),
        classes=tuple(classes),
        input=_parse_input(card, raw.get("input")),
        output=_parse_output(card, raw.get("output")),
        card_path=card.resolve(),
        weights_path=(card.parent / weights).resolve() if isinstance(weights, str) else None,
        extra={k: raw[k] for k in _DOC_KEYS & set(raw)},
    )


def shipped_card() -> ModelCard:
    """The card of the nuclei model shipped in the package."""
    return load_card(MODELS_DIR / f"{SHIPPED_MODEL}.yaml")
