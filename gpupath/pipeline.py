"""One slide end to end, and a list of slides one after another.

slide file -> sha256 -> open_slide -> tissue mask -> TileGrid -> [read batch -> resize ->
stain normalise -> detect] (next batch decoded in a background thread while the current one is
computed) -> level-0 boxes -> overlap de-duplication -> Parquet (the only place results leave
the array module they were computed in).

A slide that fails (missing, not a slide, undecodable, no mpp, no tissue) yields a failed
:class:`SlideResult` with a one-line reason; the other slides of the run go on, and nothing of
the failed slide is written except its row in ``slides.parquet``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from threadpoolctl import threadpool_limits

from gpupath import stain, vahadane
from gpupath._version import __version__
from gpupath._xp import gpu_available, gpu_problem, is_device_array, to_device
from gpupath.detect.boxes import Detections, GridLayout, dedup_overlaps
from gpupath.detect.classic import RUIFROK_HE_OD, ClassicParams
from gpupath.detect.detector import Detector, make_detector
from gpupath.detect.engines import ENGINE_NAMES
from gpupath.errors import ConfigError, GpupathError, NoTissueError, SlideReadError, unexpected
from gpupath.ingest import sha256_file
from gpupath.results import (
    completed_result,
    detections_table,
    remove_slide_parts,
    tiles_table,
    write_slide_parts,
    write_marker,
)
from gpupath.slide import (
    MPP_PLAUSIBLE_MAX,
    MPP_PLAUSIBLE_MIN,
    BackendName,
    Slide,
    check_slide_file,
    mpp_plausible,
    open_slide,
)
from gpupath.tile_loop import LoopSettings, cpu_share, read_grid_tiles, run_tiles
from gpupath.tiling import TileGrid, TileSpec, tile_grid
from gpupath_kernels.cpu import warm_up_in_background
from gpupath.tissue import compute_tissue

__all__ = ["RunParams", "SlideResult", "process_slide", "resolve_device"]

log = logging.getLogger("gpupath.pipeline")

STAIN_SAMPLE_TILES = 32
DARK_FIELD_GREY = 80.0   # median overview grey below which a slide is dark-field (fluorescence), not brightfield


@dataclass(frozen=True, slots=True)
class RunParams:
    """Everything that changes a run's results (stored in provenance)."""

    tile: TileSpec = TileSpec()
    stain: Literal["none", "macenko", "vahadane"] = "macenko"
    device: Literal["cpu", "cuda"] = "cpu"
    backend: BackendName = "auto"
    mpp_override: float | None = None      # level-0 µm/px to use instead of the slide's metadata
    batch_size: int = 32
    prefetch_batches: int = 2
    read_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # cuCIM decoder threads
    cpu_workers: int = 0                   # CPU: tile-chain workers side by side (0: one per core, at most 4)
    classic: ClassicParams = ClassicParams()   # settings of the classic detector (--engine classic)
    engine: str = "auto"                   # auto | tensorrt | torch | onnxruntime | triton | classic
    model: str | None = None               # bring-your-own ONNX model (with model_card)
    model_card: str | None = None          # its YAML card
    preprocess: str = "auto"               # model input by auto | dali | xp (NumPy/CuPy)
    reports: bool = True                   # overlay PNG, summary JSON and HTML report per slide
    triton_url: str | None = None          # engine triton: the server's HTTP endpoint, host:port
    precision: str = "auto"                # auto | fp32 | int8 (the card's int8 model, ONNX Runtime on the CPU)

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_NAMES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {self.engine!r}")
        if (self.engine == "triton") != (self.triton_url is not None):
            raise ConfigError("--engine triton needs --triton-url (host:port of the server's HTTP endpoint)"
                              if self.engine == "triton" else
                              f"--triton-url {self.triton_url} is for --engine triton (engine here: {self.engine})")
        if self.precision not in ("auto", "fp32", "int8"):
            raise ConfigError(f"precision must be auto, fp32 or int8, got {self.precision!r}")
        if self.preprocess not in ("auto", "dali", "xp"):
            raise ConfigError(f"preprocess must be auto, dali or xp, got {self.preprocess!r}")
        if self.stain not in ("none", "macenko", "vahadane"):
            raise ConfigError(f"stain must be none, macenko or vahadane, got {self.stain!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("auto", "cucim", "openslide", "tifffile"):
            raise ConfigError(f"backend must be auto, cucim, openslide or tifffile, got {self.backend!r}")
        if self.mpp_override is not None and not mpp_plausible(self.mpp_override):
            raise ConfigError(f"mpp must be in [{MPP_PLAUSIBLE_MIN}, {MPP_PLAUSIBLE_MAX}] µm/px, got {self.mpp_override}")
        if self.prefetch_batches < 0:
            raise ConfigError(f"prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if self.cpu_workers < 0:
            raise ConfigError(f"cpu_workers must be >= 0 (0: one per core), got {self.cpu_workers}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def loop_settings(self) -> LoopSettings:
        """How the tile loop is scheduled (see :mod:`gpupath.tile_loop`)."""
        return LoopSettings(device=self.device, batch_size=self.batch_size, prefetch_batches=self.prefetch_batches,
                            read_workers=self.read_workers, cpu_workers=self.cpu_workers)

    def make_detector(self) -> tuple[Detector, list[str]]:
        """The run's detector (built once: a TensorRT engine build takes minutes) and notes on the choice.
        On the CPU its engine gets one CPU worker's share of the cores (:func:`gpupath.tile_loop.cpu_share`), and
        the compiled CPU kernels start loading in the background (~0.4 s, once a process)."""
        if self.device == "cpu":
            warm_up_in_background()
        detector, notes = make_detector(self.engine, device=self.device, model=self.model, model_card=self.model_card,
                                        batch_size=self.batch_size, tile_px=self.tile.tile_px,
                                        preprocess=self.preprocess, classic=self.classic,
                                        triton_url=self.triton_url, precision=self.precision,
                                        cpu_threads=cpu_share(self.cpu_workers)[1] if self.device == "cpu" else 0)
        # a target resolution or tile size the model cannot take stops the run before any slide
        # (each slide's tiles are checked again: their mpp is the target rounded to level pixels)
        detector.check_tiles(tile_px=self.tile.tile_px, tile_mpp=self.tile.target_mpp)
        return detector, notes


@dataclass(slots=True)
class SlideResult:
    """Outcome of one slide; becomes one row of slides.parquet."""

    path: str
    status: str = "failed"
    error: str = ""
    warning: str = ""
    slide_id: str = ""
    sha256: str = ""
    vendor: str = ""
    backend: str = ""
    width_px: int | None = None
    height_px: int | None = None
    level_count: int | None = None
    mpp: float | None = None
    tile_mpp: float | None = None
    tissue_mm2: float | None = None
    n_tiles: int = 0
    n_detections: int = 0
    seconds: float = 0.0
    resumed: bool = False        # complete outputs of an earlier run for the same results key were kept
    timings: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str) -> Literal["cpu", "cuda"]:
    """``auto`` -> ``cuda`` when CuPy sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device == "cuda" and not gpu_available():
        raise ConfigError(f"device cuda asked for, but CuPy or a CUDA device is missing ({gpu_problem()}); "
                          "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or auto, got {device!r}")
    return device  # type: ignore[return-value]


class _Timer:
    """Wall seconds of the slide's stages, and the process's CPU seconds during each (``<stage>_cpu``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._cpu = time.process_time()

    def add(self, stage: str, since: float) -> float:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        self.seconds[f"{stage}_cpu"] = self.seconds.get(f"{stage}_cpu", 0.0) + cpu - self._cpu
        self._cpu = cpu
        return now

    def mark(self) -> float:
        """Start the next stage now (wall and CPU clocks): the stage before it is not counted."""
        self._cpu = time.process_time()
        return time.perf_counter()


# method -> (fit, apply, target the tiles are normalised to)
_NORMALISERS = {
    "macenko": (stain.fit_macenko, stain.apply_macenko, stain.REFERENCE),
    "vahadane": (vahadane.fit_vahadane, vahadane.apply_vahadane, vahadane.VAHADANE_REFERENCE),
}


def _fit_slide_stain(slide: Slide, grid: TileGrid, params: RunParams) -> tuple[stain.StainFit | None, str]:
    """Stain fit on the most tissue-rich tiles (up to STAIN_SAMPLE_TILES of them): the ``--stain``
    method's, or with ``--stain none`` a Macenko fit that gives a stain-reading detector the slide's
    own basis."""
    order = np.argsort(-grid.tissue_fraction, kind="stable")
    sample = np.sort(order[: STAIN_SAMPLE_TILES])
    fit = _NORMALISERS.get(params.stain, _NORMALISERS["macenko"])[0]
    # the sample is spread over the whole slide: decoded on the host and uploaded (cuCIM's GPU batch
    # reader would read the whole file span between the first and last tile into device memory)
    try:
        pixels = read_grid_tiles(slide, grid, sample, device="cpu").pixels
        return fit(pixels if params.device == "cpu" else to_device(pixels)), ""
    except ValueError as exc:
        if params.stain in _NORMALISERS:
            return None, f"stain fit failed ({exc}); tiles not normalised, Ruifrok H&E basis used"
        return None, f"stain basis fit failed ({exc}); Ruifrok H&E basis used"


# RunParams fields that change how fast or where a run goes, not what it finds
PERFORMANCE_FIELDS = frozenset({"device", "batch_size", "prefetch_batches", "read_workers", "cpu_workers", "triton_url",
                                "reports"})


def detector_record(detector: Detector) -> dict[str, Any]:
    """What ran, for run.json and the reports: model name, engine, sha256 of the model file, classes."""
    return {"model": detector.name, "engine": detector.engine, "model_sha256": detector.model_sha256,
            "precision": getattr(detector, "precision", None), "classes": list(detector.classes)}


def _write_reports(out_dir: Path, result: SlideResult, params: RunParams, detector: Detector, slide: Slide,
                   tissue: Any) -> None:
    """A slide's overlay, summary, HTML report and QuPath GeoJSON (from its partitions, the open slide
    and its tissue mask). Derived outputs: a failure here is a warning on the slide, never a failed slide."""
    from gpupath.report import write_slide_outputs
    from gpupath.report.geojson import write_geojson

    environment = {"device": params.device, "gpupath": __version__, "detector": detector_record(detector)}
    try:
        host_tissue = None if is_device_array(getattr(tissue, "mask", None)) else tissue  # the report draws on the host
        write_slide_outputs(out_dir, asdict(result), params=params.to_dict(), environment=environment, slide=slide,
                            tissue=host_tissue)
        write_geojson(out_dir, result.slide_id)  # QuPath: File > Import objects
    except Exception as exc:  # noqa: BLE001  derived outputs: the slide's results stand (unexpected ones logged)
        unexpected(log, f"{result.path}: report", exc)
        note = f"report not written ({type(exc).__name__}: {exc}); rebuild with gpupath report"
        result.warning = f"{result.warning}; {note}" if result.warning else note


def results_key(params: RunParams, detector: Detector) -> str:
    """sha256 of everything that decides a slide's results: parameters (not the performance knobs),
    model name, engine and the sha256 of the model file that runs, and the gpupath version."""
    import hashlib
    import json

    fields = {k: v for k, v in params.to_dict().items() if k not in PERFORMANCE_FIELDS}
    what = {"params": fields, "model": detector.name, "engine": detector.engine,
            "model_sha256": detector.model_sha256, "gpupath": __version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def expected_sha256(path: Path, checksums: dict[str, str] | None = None) -> str | None:
    """The sha256 a slide must have: from ``checksums`` (file name -> hex) or a ``<slide>.sha256``
    sidecar (sha256sum format: the hex, optionally followed by the name); None when neither says."""
    if checksums and path.name in checksums:
        return checksums[path.name].lower()
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").split()
        return text[0].lower() if text else ""
    return None


def process_slide(path: str | Path, out_dir: Path, params: RunParams, *, detector: Detector | None = None,
                  resume: bool = True, checksums: dict[str, str] | None = None, stored_sha256: str | None = None,
                  on_tiles: Callable[[int, int], None] | None = None) -> SlideResult:
    """Run one slide and write its partitions. Never raises for a bad slide: see ``status``/``error``.

    ``detector``: built once per run by :meth:`RunParams.make_detector` (default: built here,
    raising ConfigError when the engine or model cannot run). With ``resume``, a slide whose
    outputs in ``out_dir`` are complete for the same :func:`results_key` is not redone: its
    recorded result comes back with ``resumed=True``. A slide whose sha256 differs from the one
    ``checksums`` or its ``.sha256`` sidecar gives (:func:`expected_sha256`) fails before anything
    reads it as a slide; so does a slide of a store (``stored_sha256``: its manifest's hash) whose
    bytes changed since ingest. ``on_tiles(done, total)`` is called after each batch (progress display).
    """
    if detector is None:
        detector, _ = params.make_detector()
    # One BLAS thread: the small GEMMs here gain nothing from more, and OpenBLAS worker threads
    # spinning beside the prefetch thread made a slide 6x slower on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        return _process_slide(path, Path(out_dir), params, detector, resume=resume, checksums=checksums,
                              stored_sha256=stored_sha256, on_tiles=on_tiles)


def _verified_sha256(path: Path, checksums: dict[str, str] | None, stored_sha256: str | None) -> str:
    """The slide file's sha256, after the checksum policy (listed and matching) and, for a stored slide,
    the store's (unchanged since ingest); else SlideReadError. Hashed streaming, once."""
    check_slide_file(path)
    sha = sha256_file(path)
    if stored_sha256 is not None and sha != stored_sha256.lower():
        raise SlideReadError(f"{path}: changed since ingest: the store's manifest has sha256 {stored_sha256}, the "
                             f"file now has {sha} (damaged or replaced; not processed; ingest the original again)")
    want = expected_sha256(path, checksums)
    if want is None and checksums is not None:
        raise SlideReadError(f"{path}: not listed in the checksums file (every slide of a verified run must be)")
    if want is not None and want != sha:
        raise SlideReadError(f"{path}: sha256 mismatch: expected {want}, got {sha} "
                             "(a damaged or different file; not processed)")
    return sha


def _tissue_and_grid(slide: Slide, path: str | Path, mpp: float, params: RunParams, detector: Detector,
                     result: SlideResult) -> tuple[Any, TileGrid]:
    """Tissue mask and tile grid of an open slide; NoTissueError when no tile holds enough tissue."""
    tissue = compute_tissue(slide, mpp=mpp, device=params.device)
    result.tissue_mm2 = tissue.area_mm2
    grid = tile_grid(level_dimensions=slide.level_dimensions, level_downsamples=slide.level_downsamples,
                     mpp=mpp, mask=tissue, spec=params.tile)
    result.tile_mpp = grid.tile_mpp
    if len(grid) == 0:
        raise NoTissueError(
            f"{path}: no tissue found (tissue is {tissue.fraction:.1%} of the overview; "
            f"no {grid.tile_px}-px tile at {grid.tile_mpp:.3g} µm/px holds >= {params.tile.min_tissue:.0%})"
        )
    try:
        detector.check_tiles(tile_px=grid.tile_px, tile_mpp=grid.tile_mpp)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return tissue, grid


@dataclass(frozen=True, slots=True)
class _StainPlan:
    """How a slide's tiles are normalised (``fit`` None: not at all) and the stain basis the detector gets."""

    fit: stain.StainFit | None
    normalise: bool
    basis: np.ndarray
    warnings: tuple[str, ...]


def _stain_plan(slide: Slide, grid: TileGrid, params: RunParams, tissue: Any, detector: Detector) -> _StainPlan:
    """The slide's stain fit: for normalising (``--stain macenko|vahadane``) or for a detector that reads
    the stain basis; with ``--stain none`` and a detector that sees RGB only, no fit at all."""
    if params.stain in _NORMALISERS or detector.uses_stain_basis:
        fit, stain_warning = _fit_slide_stain(slide, grid, params)
    else:
        fit, stain_warning = None, ""
    warnings = [stain_warning] if stain_warning else []
    if tissue.median_grey < DARK_FIELD_GREY:
        warnings.append(f"dark background (median grey {tissue.median_grey:.0f}): looks like fluorescence, "
                        "for which the H&E nuclei detector is not made")
    normalise = fit is not None and params.stain in _NORMALISERS
    basis = RUIFROK_HE_OD if fit is None else fit.stain_matrix_od
    if normalise:
        basis = _NORMALISERS[params.stain][2].stain_matrix_od  # tiles are rendered in the target's stains
    return _StainPlan(fit=fit, normalise=normalise, basis=basis, warnings=tuple(warnings))


def _detect_tiles(slide: Slide, grid: TileGrid, params: RunParams, detector: Detector, plan: _StainPlan,
                  timer: _Timer, on_tiles: Callable[[int, int], None] | None) -> list[Detections]:
    """Read, normalise and detect every tile of the grid (scheduled by :func:`gpupath.tile_loop.run_tiles`)."""
    normalise = None
    if plan.normalise:
        _, apply, target = _NORMALISERS[params.stain]
        fit = plan.fit

        def normalise(tiles: Any) -> Any:
            return apply(tiles, fit, target=target)

    return run_tiles(slide, grid, detector, params.loop_settings(), normalise=normalise, basis=plan.basis,
                     seconds=timer.seconds, on_tiles=on_tiles)


def _merge_tiles(parts: list[Detections], grid: TileGrid, detector: Detector, mpp: float,
                 dimensions: tuple[int, int]) -> tuple[Detections, np.ndarray]:
    """One slide's detections: overlap duplicates removed, clipped to the slide; and the count per tile."""
    layout = GridLayout.from_cells(stride_l0=grid.stride_l0, overlap_l0=grid.overlap_l0, n_cols=grid.n_cols,
                                   n_rows=grid.n_rows, col=grid.col, row=grid.row)
    det = dedup_overlaps(Detections.concat(parts), layout, min_distance_l0_px=detector.dedup_distance_um / mpp,
                         any_label=getattr(detector, "dedup_any_label", False))
    det = det.clip_to(*dimensions)
    index_of = np.full((grid.n_rows, grid.n_cols), -1, np.int64)  # grid cell -> position in the tile table
    index_of[grid.row, grid.col] = np.arange(len(grid))
    col, row = det.tile_cells(grid.stride_l0)
    per_tile = np.bincount(index_of[row, col], minlength=len(grid))
    return det, per_tile


def _write_parts(out_dir: Path, result: SlideResult, path: str | Path, mpp: float, grid: TileGrid,
                 params: RunParams, detector: Detector, det: Detections, per_tile: np.ndarray) -> None:
    provenance = {
        "slide_sha256": result.sha256, "slide_path": str(path), "slide_mpp": mpp,
        "tile_mpp": grid.tile_mpp, "model": detector.name, "engine": detector.engine,
        "model_sha256": detector.model_sha256, "params": params.to_dict(),
    }
    write_slide_parts(
        out_dir, result.slide_id,
        detections_table(det, stride_l0=grid.stride_l0, label_names=list(detector.classes), provenance=provenance),
        tiles_table(x=grid.x, y=grid.y, size_l0_px=grid.size_l0_px, col=grid.col, row=grid.row,
                    level=grid.level, tissue_fraction=grid.tissue_fraction, n_detections=per_tile,
                    provenance=provenance),
    )


def _resumed_result(out_dir: Path, path: str | Path, slide_id: str, key: str, start: float) -> SlideResult | None:
    """The recorded result of complete outputs for the same results key, or None."""
    done = completed_result(out_dir, slide_id, key)
    if done is None:
        return None
    kept = SlideResult(**{k: v for k, v in done.items() if k in SlideResult.__dataclass_fields__})
    if str(done.get("path", "")) != str(path):  # another file with the same bytes made them (this run or one before)
        same = f"same bytes as {done.get('path')} (sha256 {slide_id[:12]}): its outputs are this slide's"
        kept.warning = "; ".join(w for w in (same, kept.warning) if w)
    kept.path, kept.resumed, kept.seconds = str(path), True, time.perf_counter() - start
    return kept


def _process_slide(path: str | Path, out_dir: Path, params: RunParams, detector: Detector, *, resume: bool,
                   checksums: dict[str, str] | None, stored_sha256: str | None,
                   on_tiles: Callable[[int, int], None] | None) -> SlideResult:
    start = time.perf_counter()
    if params.device == "cpu":  # Numba and the CPU kernels load (~0.4 s, once a process) while the slide is hashed
        warm_up_in_background()
    result = SlideResult(path=str(path))
    timer = _Timer()
    key = results_key(params, detector)
    try:
        t = timer.mark()
        result.sha256 = result.slide_id = _verified_sha256(Path(path), checksums, stored_sha256)
        if resume and (kept := _resumed_result(out_dir, path, result.slide_id, key, start)) is not None:
            return kept
        remove_slide_parts(out_dir, result.slide_id)  # a failed re-run must not leave the old results
        t = timer.add("sha256", t)
        with open_slide(path, backend=params.backend, mpp=params.mpp_override) as slide:
            result.backend, result.vendor = slide.backend, slide.vendor
            result.width_px, result.height_px = slide.dimensions
            result.level_count = slide.level_count
            result.mpp = mpp = slide.require_mpp()
            t = timer.add("open", t)
            tissue, grid = _tissue_and_grid(slide, path, mpp, params, detector, result)
            t = timer.add("tissue", t)
            plan = _stain_plan(slide, grid, params, tissue, detector)
            result.warning = "; ".join(plan.warnings)
            t = timer.add("stain_fit", t)
            parts = _detect_tiles(slide, grid, params, detector, plan, timer, on_tiles)
            t = timer.mark()  # the tile loop timed itself (tiles, tiles_cpu and its stages)
            det, per_tile = _merge_tiles(parts, grid, detector, mpp, slide.dimensions)
            t = timer.add("dedup", t)
            _write_parts(out_dir, result, path, mpp, grid, params, detector, det, per_tile)
            t = timer.add("write", t)
            result.n_tiles, result.n_detections = len(grid), len(det)
            result.status = "ok"
            result.seconds = time.perf_counter() - start
            result.timings = timer.seconds
            # the marker vouches for both partitions (a run killed before this line is redone); the
            # reports are derived from them and come after (rebuilt any time with gpupath report)
            write_marker(out_dir, result.slide_id, results_key=key, result=asdict(result))
            if params.reports:
                _write_reports(out_dir, result, params, detector, slide, tissue)
                timer.add("report", t)
                write_marker(out_dir, result.slide_id, results_key=key, result=asdict(result))  # with its warning
    except GpupathError as exc:
        result.status, result.error = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001  one slide's failure is its result; the batch goes on
        unexpected(log, str(path), exc)
        result.status, result.error = "failed", f"{path}: {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    result.timings = timer.seconds
    return result
