"""One ``Detector`` interface over every engine: tiles in, boxes in tile pixels out.

:func:`make_detector` turns ``--engine auto|tensorrt|torch|onnxruntime|triton|classic`` (plus an
optional ``--model``/``--model-card``; ``triton`` also ``--triton-url``, the server that runs the
model) into a ready detector and a list of one-line notes on what it chose and why. ``auto``
tries, on a GPU, TensorRT, then torch-CUDA, then ONNX Runtime's CUDA provider; on the CPU, ONNX
Runtime then torch (never a Triton server); each engine it skips gets one note saying why. An
engine named explicitly either works or fails with its reason (no silent substitute).

A learned detector is preprocessing (DALI, or the NumPy/CuPy reference) -> engine -> decoder
(:mod:`gpupath.detect.decoders`), all on the tiles' device; only the decoded boxes leave it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from gpupath._xp import is_device_array
from gpupath.detect.card import ModelCard, file_sha256, load_card, shipped_card
from gpupath.detect.classic import ClassicParams, detect_nuclei
from gpupath.detect.decoders import decode
from gpupath.types import TileBoxes
from gpupath.detect.engines import ENGINE_NAMES, Engine, OnnxRuntimeEngine, TorchEngine, check_onnx_io
from gpupath.errors import ConfigError, KernelError, unexpected

__all__ = ["Detector", "ClassicDetector", "LearnedDetector", "make_detector", "CLASSIC_NAME"]

log = logging.getLogger("gpupath.detect")

CLASSIC_NAME = "classic-log-v1"


class Detector(Protocol):
    name: str                       # model name for provenance
    engine: str                     # classic | onnxruntime | torch | tensorrt | triton
    classes: tuple[str, ...]
    model_sha256: str               # "" for the classic detector
    dedup_distance_um: float        # twins closer than this across tile overlaps are one object
    uses_stain_basis: bool          # detect() reads stain_matrix_od (else the slide needs no stain fit for it)

    def check_tiles(self, *, tile_px: int, tile_mpp: float) -> None: ...

    def detect(self, tiles: Any, *, tile_mpp: float, stain_matrix_od: np.ndarray) -> TileBoxes: ...


@dataclass(slots=True)
class ClassicDetector:
    """LoG on the hematoxylin channel (:mod:`gpupath.detect.classic`); needs no model."""

    params: ClassicParams = field(default_factory=ClassicParams)
    name: str = CLASSIC_NAME
    engine: str = "classic"
    classes: tuple[str, ...] = ("nucleus",)
    model_sha256: str = ""
    uses_stain_basis: bool = True   # hematoxylin by colour deconvolution in the slide's stains

    @property
    def dedup_distance_um(self) -> float:
        return self.params.radius_um[0]

    def check_tiles(self, *, tile_px: int, tile_mpp: float) -> None:
        """Any tile size and resolution: radii are in µm."""

    def detect(self, tiles: Any, *, tile_mpp: float, stain_matrix_od: np.ndarray) -> TileBoxes:
        found = detect_nuclei(tiles, mpp=tile_mpp, params=self.params, stain_matrix_od=stain_matrix_od)
        return TileBoxes.from_centres(tile_index=found.tile_index, cx_px=found.cx_px, cy_px=found.cy_px,
                                      half_w_px=found.radius_px, half_h_px=found.radius_px, score=found.score,
                                      label=np.zeros(len(found.score), np.int16))


CPU_CHUNK = 4  # tiles per preprocess + engine call on the CPU


class LearnedDetector:
    """A card's model on one engine: preprocess -> engine -> decode."""

    def __init__(self, card: ModelCard, engine: Engine, *, preprocessor: Any, preprocess_name: str) -> None:
        self.card = card
        self.engine_impl = engine
        self.engine = engine.name
        self.device = engine.device
        self.name = card.name
        self.classes = card.classes
        # provenance: the file whose numbers ran (the torch engine runs the .npz weights, not the ONNX)
        ran = card.weights_path if engine.name == "torch" and card.weights_path is not None else card.model_path
        ran = getattr(engine, "model_path", None) or ran  # ONNX Runtime may run the card's int8 file
        self.precision = "int8" if card.int8_path is not None and ran == card.int8_path else "fp32"
        self.model_sha256 = card.model_sha256 if ran == card.model_path else file_sha256(ran)
        self.dedup_distance_um = float(card.extra.get("dedup_distance_um", 2.5))
        # twins across a tile overlap are one object whatever label each tile gave it: a model that reads
        # the class at a peak (nuclei_v2) can label one nucleus differently from two tiles' contexts
        self.dedup_any_label = True
        self.uses_stain_basis = False  # the model sees RGB only
        self.preprocessor = preprocessor
        self.preprocess_name = preprocess_name

    def check_tiles(self, *, tile_px: int, tile_mpp: float) -> None:
        self.card.check_tile(tile_px=tile_px, tile_mpp=tile_mpp)

    def detect(self, tiles: Any, *, tile_mpp: float, stain_matrix_od: np.ndarray) -> TileBoxes:
        """Boxes in tile px. ``tile_mpp`` (µm per tile px) was checked against the card by :meth:`check_tiles`;
        stains are unused."""
        from gpupath.detect.preprocess import input_scale

        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"tiles must be (N, H, W, 3), got shape {tuple(tiles.shape)}")
        if len(tiles) == 0:
            return TileBoxes.empty()
        if is_device_array(tiles) != (self.device == "cuda"):
            raise TypeError(f"{self.engine} engine on {self.device} got {'device' if is_device_array(tiles) else 'host'}"
                            " tiles; run the pipeline with the same --device")
        outputs = self._run(tiles)
        tile_px = int(tiles.shape[1])
        found = decode(outputs, self.card.output, input_hw=self.card.input.input_hw(tile_px),
                       scale_yx=input_scale(self.card.input, tile_px))
        bad = (found.label < 0) | (found.label >= len(self.classes))
        if bad.any():
            raise ValueError(f"model {self.name} ({self.card.model_path.name}) gave class label "
                             f"{int(found.label[bad][0])}; its card lists {len(self.classes)} classes "
                             f"({', '.join(self.classes)})")
        return found


    def _run(self, tiles: Any) -> dict[str, Any]:
        """Preprocess + engine. On the CPU, CPU_CHUNK tiles at a time, joined back in order: the model input
        and the engine's activations of a few tiles, not of the whole batch, are in memory, and the engine
        is faster for it (int8, ONNX Runtime, one thread: 384 / 375 / 362 tiles/s at 4 / 8 / 16 tiles)."""
        if self.device != "cpu" or len(tiles) <= CPU_CHUNK:
            return self.engine_impl(self.preprocessor(tiles))
        runs = [self.engine_impl(self.preprocessor(tiles[i:i + CPU_CHUNK])) for i in range(0, len(tiles), CPU_CHUNK)]
        return {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}


def _resolve_card(model: str | Path | None, model_card: str | Path | None) -> ModelCard:
    if model_card is not None:
        card = load_card(model_card, model_path=model)
    elif model is not None:
        raise ConfigError(f"--model {model}: a model needs its card (--model-card card.yaml: input, outputs, decoder)")
    else:
        card = shipped_card()
    want = card.extra.get("sha256")
    if want and want != card.model_sha256:
        raise ConfigError(f"{card.model_path}: sha256 {card.model_sha256[:12]}... differs from the card's "
                          f"{str(want)[:12]}... (the model file changed; fix the card or the file)")
    return card


def _check_file(path: Path | None, want: Any, what: str) -> None:
    """A file the card pins by sha256 (``want``) must still be that file."""
    if path is not None and path.is_file() and want:
        got = file_sha256(path)
        if got != want:
            raise ConfigError(f"{path}: sha256 {got[:12]}... differs from the card's "
                              f"{str(want)[:12]}... (the {what} changed; fix the card or the file)")


def _check_weights(card: ModelCard) -> None:
    """The torch engine runs the .npz weights: they must be the card's too."""
    _check_file(card.weights_path, card.extra.get("weights_sha256"), "weights")


PRECISIONS = ("auto", "fp32", "int8")


def _onnx_file(card: ModelCard, *, device: str, precision: str) -> Path:
    """The ONNX file ONNX Runtime runs: the card's int8 one on the CPU (``auto``, or asked), else its model."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8":
        if card.int8_path is None:
            raise ConfigError(f"--precision int8: model {card.name} has no int8 file (card key int8_model)")
        if device != "cpu":
            raise ConfigError("--precision int8 is for ONNX Runtime on the CPU (device here: cuda)")
    if precision == "fp32" or card.int8_path is None or device != "cpu":
        return card.model_path
    _check_file(card.int8_path, card.extra.get("int8_sha256"), "int8 model")
    return card.int8_path


def _build_engine(name: str, card: ModelCard, *, device: str, batch_size: int, tile_px: int,
                  cache_dir: str | Path | None, triton_url: str | None = None,
                  triton_model: str | None = None, precision: str = "fp32", cpu_threads: int = 0) -> Engine:
    if precision == "int8" and name != "onnxruntime":
        raise ConfigError(f"--precision int8 runs on ONNX Runtime only (engine here: {name})")
    if name == "onnxruntime":
        return OnnxRuntimeEngine(card, device=device, intra_op_threads=cpu_threads,  # type: ignore[arg-type]
                                 model_path=_onnx_file(card, device=device, precision=precision))
    if name == "torch":
        _check_weights(card)
        return TorchEngine(card, device=device)  # type: ignore[arg-type]
    if name == "tensorrt":
        if device != "cuda":
            raise ConfigError(f"tensorrt engine needs --device cuda (device here: {device})")
        from gpupath.detect._tensorrt import TensorRTEngine

        out = card.output
        return TensorRTEngine(card.model_path, model_sha256=card.model_sha256, input_name=card.input.name,
                              output_names=out.names, max_batch=batch_size, input_hw=card.input.input_hw(tile_px),
                              cache_dir=cache_dir)
    if name == "triton":
        if not triton_url:
            raise ConfigError("--engine triton needs --triton-url (host:port of the server's HTTP endpoint)")
        from gpupath.detect._triton import TritonEngine

        return TritonEngine(card, url=triton_url, model_name=triton_model, device=device)  # type: ignore[arg-type]
    raise ConfigError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {name!r}")


def _build_preprocessor(kind: str, card: ModelCard, *, device: str, batch_size: int,
                        tile_px: int) -> tuple[Any, str, str]:
    """(callable, name, note) for preprocess kind ``auto | dali | xp``.

    A DALI pipeline is built and run once here on a blank batch, so a DALI that imports but
    cannot run (driver, device) falls back (auto) or fails (dali) before any slide is read.
    """
    from gpupath.detect.dali_feed import DaliPreprocessor, dali_available
    from gpupath.detect.preprocess import preprocess

    if kind not in ("auto", "dali", "xp"):
        raise ConfigError(f"preprocess must be auto, dali or xp, got {kind!r}")
    if kind == "dali" or (kind == "auto" and device == "cuda"):
        ok, why = dali_available()
        if ok:
            try:
                dali = DaliPreprocessor(card.input, batch_size=batch_size, device=device,  # type: ignore[arg-type]
                                        device_id=_device_id(device))
                blank = np.full((1, tile_px, tile_px, 3), 255, np.uint8)
                dali(blank if device == "cpu" else _to_device(blank))  # build + run once (warm-up)
                return dali, "dali", ""
            except Exception as exc:  # noqa: BLE001  DALI raises RuntimeError with backend text for most failures
                ok, why = False, f"DALI pipeline failed to run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if kind == "dali":
            raise ConfigError(f"--preprocess dali: {why}")
        note = f"DALI unavailable ({why}); tiles preprocessed with CuPy"
        return (lambda t: preprocess(t, card.input)), "xp", note
    return (lambda t: preprocess(t, card.input)), "xp", ""


def _device_id(device: str) -> int:
    if device != "cuda":
        return 0
    import cupy

    return int(cupy.cuda.Device().id)


def _to_device(a: np.ndarray) -> Any:
    from gpupath._xp import to_device

    return to_device(a)


def make_detector(engine: str = "auto", *, device: Literal["cpu", "cuda"] = "cpu", model: str | Path | None = None,
                  model_card: str | Path | None = None, batch_size: int = 32, tile_px: int = 256,
                  preprocess: str = "auto", cache_dir: str | Path | None = None,
                  classic: ClassicParams | None = None, triton_url: str | None = None,
                  triton_model: str | None = None, precision: str = "fp32",
                  cpu_threads: int = 0) -> tuple[Detector, list[str]]:
    """A detector for ``engine`` on ``device``, and notes on what was chosen and why.

    Parameters
    ----------
    engine : auto | tensorrt | torch | onnxruntime | triton | classic (auto never picks triton).
    device : where tiles arrive (CuPy on cuda, NumPy on cpu).
    model, model_card : a bring-your-own ONNX model and its YAML card; default the shipped model.
    batch_size : largest batch (TensorRT's optimisation profile).
    tile_px : tile edge handed to the detector, px.
    preprocess : auto (DALI on a GPU when installed, else NumPy/CuPy) | dali | xp.
    cache_dir : TensorRT engine cache (default ``$GPUPATH_ENGINE_CACHE`` or ~/.cache/gpupath/engines).
    classic : classic-detector settings.
    triton_url, triton_model : the Triton server (``host:port``, HTTP) and the model's name there
        (default the card's name); used by ``engine="triton"`` only.
    precision : fp32 (the card's model) | int8 (its ``int8_model``: ONNX Runtime on the CPU) | auto
        (int8 where the card has one and ONNX Runtime runs on the CPU, else fp32). The pipeline's
        default is auto (RunParams); this function's fp32, so engines compare on one file.
    cpu_threads : threads of ONNX Runtime on the CPU per call (0: ONNX Runtime's default, all cores);
        the pipeline's CPU workers each call the engine with their share.

    Raises
    ------
    ConfigError
        Unknown engine; a Triton URL without ``engine="triton"`` or the reverse; an explicitly
        named engine that cannot run here (with the reason); a card that does not fit its model;
        no engine at all.
    """
    if engine not in ENGINE_NAMES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {engine!r}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    if triton_url is not None and engine != "triton":
        raise ConfigError(f"--triton-url {triton_url} is for --engine triton (engine here: {engine}; "
                          "auto never picks a server)")
    if engine == "classic":
        if model is not None or model_card is not None:
            raise ConfigError("--engine classic takes no --model/--model-card")
        if preprocess != "auto":
            raise ConfigError(f"--preprocess {preprocess} is the learned models' input pipeline; --engine classic "
                              "has none (leave --preprocess out)")
        return ClassicDetector(classic or ClassicParams()), []
    card = _resolve_card(model, model_card)
    check_onnx_io(card)
    order = [engine] if engine != "auto" else (
        ["tensorrt", "torch", "onnxruntime"] if device == "cuda" else ["onnxruntime", "torch"])
    notes: list[str] = []
    built: Engine | None = None
    for name in order:
        try:
            built = _build_engine(name, card, device=device, batch_size=batch_size, tile_px=tile_px,
                                  cache_dir=cache_dir, triton_url=triton_url, triton_model=triton_model,
                                  precision=precision, cpu_threads=cpu_threads)
            break
        except Exception as exc:
            if engine != "auto":
                raise  # named explicitly: no substitute (ConfigError, KernelError for a failed TensorRT build, ...)
            # an engine that has never run on this node may fail in ways its code does not foresee (a CUDA
            # error, an API change in a new TensorRT): auto says so in the note and moves on
            unexpected(log, f"engine {name}", exc)
            why = str(exc) if isinstance(exc, (ConfigError, KernelError)) else f"{type(exc).__name__}: {exc}"
            notes.append(f"engine {name} skipped: {why}")
    if built is None:
        raise ConfigError(f"no engine can run {card.name} on {device}: " + "; ".join(notes))
    pre, pre_name, pre_note = _build_preprocessor(preprocess, card, device=device, batch_size=batch_size,
                                                  tile_px=tile_px)
    if pre_note:
        notes.append(pre_note)
    detector = LearnedDetector(card, built, preprocessor=pre, preprocess_name=pre_name)
    if engine == "auto":
        notes.append(f"engine auto: {card.name} on {built.name} ({device}, {detector.precision}), "
                     f"preprocessing by {pre_name}")
    elif detector.precision == "int8":
        notes.append(f"{card.name} runs its int8 file on {built.name} (cpu); --precision fp32 for the fp32 model")
    for note in notes:
        log.debug("%s", note)  # callers show notes (the CLI prints them once as `note:` lines)
    return detector, notes
