"""Model cards: what a detector model takes in, what it gives out, and how to decode it.

A card is a small YAML file beside an ONNX model. It fixes everything the pipeline needs to
run a model it did not train: the input tensor (name, layout, channel order, size, µm per
pixel, normalisation) and the outputs with their decoder (``heatmap``: centre heatmap + size
(+ offset) maps; ``boxes``: box list + scores (+ labels); the registry is
:data:`gpupath.detect.decoders.DECODERS`, each decoder reads its own ``output:`` keys). The shipped nuclei model has one
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

from gpupath.detect.card_fields import card_error, choice, refuse_unknown_keys
from gpupath.detect.decoders import BoxesOutput, HeatmapOutput, OutputSpec, parse_output
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
class ModelCard:
    """A validated card. ``model_path`` is absolute; ``extra`` keeps documentation keys."""

    name: str
    model_path: Path
    classes: tuple[str, ...]
    input: InputSpec
    output: OutputSpec
    card_path: Path | None = None
    weights_path: Path | None = None              # torch weights (.npz) of the shipped architecture
    int8_path: Path | None = None                 # int8-quantised ONNX of the same model (ONNX Runtime, CPU)
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
             "int8_sha256",
             "dedup_distance_um"}
_INPUT_KEYS = {"name", "layout", "channels", "dtype", "mpp", "size_px", "multiple_of", "scale", "mean", "std"}
def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a model or weights file (:func:`gpupath.files.sha256_file`, the slides' hash)."""
    from gpupath.files import sha256_file

    return sha256_file(path)


def _triple(card: Path, key: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or (positive and min(vals) <= 0):
        raise card_error(card, f"input.{key} must be 3 {'positive ' if positive else ''}numbers, got {value!r}")
    return vals  # type: ignore[return-value]


def _parse_input(card: Path, d: Any) -> InputSpec:
    if not isinstance(d, dict) or "name" not in d:
        raise card_error(card, "input must be a mapping with at least a name")
    refuse_unknown_keys(card, "input", d, _INPUT_KEYS)
    size = d.get("size_px")
    if size is not None:
        if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise card_error(card, f"input.size_px must be [height, width] positive ints or null, got {size!r}")
        size = (int(size[0]), int(size[1]))
    mpp, multiple = d.get("mpp", 0.5), d.get("multiple_of", 1)
    if not (isinstance(mpp, int | float) and 0 < mpp <= 20):
        raise card_error(card, f"input.mpp must be µm/px in (0, 20], got {mpp!r}")
    if not (isinstance(multiple, int) and multiple >= 1):
        raise card_error(card, f"input.multiple_of must be an int >= 1, got {multiple!r}")
    scale = d.get("scale", 255.0)
    if not (isinstance(scale, int | float) and scale > 0):
        raise card_error(card, f"input.scale must be a positive number, got {scale!r}")
    return InputSpec(
        name=str(d["name"]),
        layout=choice(card, "input.layout", d.get("layout", "NCHW"), ("NCHW", "NHWC")),
        channels=choice(card, "input.channels", d.get("channels", "RGB"), ("RGB", "BGR")),
        dtype=choice(card, "input.dtype", d.get("dtype", "float32"), ("float32", "float16")),
        mpp=float(mpp), size_px=size, multiple_of=multiple, scale=float(scale),
        mean=_triple(card, "mean", d.get("mean", (0, 0, 0)), positive=False),
        std=_triple(card, "std", d.get("std", (1, 1, 1)), positive=True),
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
        raise card_error(card, "a model card is a YAML mapping")
    if raw.get("format", CARD_FORMAT) != CARD_FORMAT:
        raise card_error(card, f"format must be {CARD_FORMAT}, got {raw.get('format')!r}")
    refuse_unknown_keys(card, "the card", raw,
                        _DOC_KEYS | {"name", "model", "weights", "int8_model", "classes", "input", "output"})
    classes = raw.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise card_error(card, f"classes must be a non-empty list of names, got {classes!r}")
    explicit_model = model_path is not None  # --model: the card's int8 file is of another model
    if model_path is None:
        if not isinstance(raw.get("model"), str):
            raise card_error(card, "no model file: give `model:` in the card or --model")
        model_path = card.parent / raw["model"]
    model = Path(model_path)
    if not model.is_file():
        raise ConfigError(f"{model}: model file not found (card {card})")
    weights, int8 = raw.get("weights"), raw.get("int8_model")
    if int8 is not None and not (isinstance(int8, str) and (card.parent / int8).is_file()):
        raise card_error(card, f"int8_model must name an ONNX file beside the card, got {int8!r}")
    dedup = raw.get("dedup_distance_um", 2.5)
    if not (isinstance(dedup, int | float) and not isinstance(dedup, bool) and 0 < dedup <= 1000):
        raise card_error(card, f"dedup_distance_um must be a number of µm in (0, 1000], got {dedup!r}")
    return ModelCard(
        name=str(raw.get("name", model.stem)),
        model_path=model.resolve(),
        classes=tuple(classes),
        input=_parse_input(card, raw.get("input")),
        output=parse_output(card, raw.get("output")),
        card_path=card.resolve(),
        weights_path=(card.parent / weights).resolve() if isinstance(weights, str) else None,
        int8_path=(card.parent / int8).resolve() if isinstance(int8, str) and not explicit_model else None,
        extra={k: raw[k] for k in _DOC_KEYS & set(raw)},
    )


def shipped_card() -> ModelCard:
    """The card of the nuclei model shipped in the package."""
    return load_card(MODELS_DIR / f"{SHIPPED_MODEL}.yaml")
