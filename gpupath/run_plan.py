"""``gpupath run``'s options, validated once, into the plan a batch runs.

:class:`RunOptions` holds what the user typed (CLI options or a script's arguments), nothing
resolved yet. :func:`plan_run` checks them all, applies the run policies (magnification to µm/px,
the checksum file matched by slide file name, ``--device auto`` resolved) and returns a
:class:`RunPlan`: the slide list, the :class:`~gpupath.pipeline.RunParams` and what the batch
needs besides. Every problem is one :class:`~gpupath.errors.ConfigError` line, raised before any
slide is read. The CLI only parses, calls this, shows progress and sets the exit code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpupath.batch import expand_inputs, store_slides
from gpupath.errors import ConfigError
from gpupath.pipeline import RunParams, resolve_device
from gpupath.tiling import DEFAULT_TARGET_MPP, TileSpec

__all__ = ["RunOptions", "RunPlan", "plan_run", "expected_checksums", "MICRONS_AT_10X"]

MICRONS_AT_10X = 10.0  # µm/px x magnification: a 10x objective gives ~1 µm/px, the usual scanner convention


@dataclass(frozen=True, slots=True)
class RunOptions:
    """``gpupath run`` as typed: slides and folders, output folder and every option (None: not given)."""

    slides: tuple[Path, ...]
    out: Path
    mpp: float | None = None
    target_mpp: float | None = None
    magnification: float | None = None
    tile: int = 256
    overlap: int = 32
    stain: str = "macenko"
    device: str = "auto"
    backend: str = "auto"
    batch_size: int = 32
    min_tissue: float = 0.05
    engine: str = "auto"
    model: Path | None = None
    model_card: Path | None = None
    preprocess: str = "auto"
    precision: str = "auto"
    store: Path | None = None
    workers: int | None = None
    scheduler: str | None = None
    redo: bool = False
    triton_url: str | None = None
    checksums: Path | None = None
    reports: bool = True


@dataclass(frozen=True, slots=True)
class RunPlan:
    """A validated run: what :func:`gpupath.batch.run_batch` is called with, plus what to tell the user."""

    slides: list[Path]
    out: Path
    params: RunParams
    workers: int | None
    scheduler: str | None
    resume: bool
    checksums: dict[str, str] | None           # file name -> sha256 every slide must match (None: not asked)
    stored: dict[str, str] = field(default_factory=dict)  # a store's slides: path -> sha256 at ingest
    refused: list[str] = field(default_factory=list)      # manifest rows not read, one sentence each
    device_note: str | None = None             # "device: cpu (no usable CUDA GPU found)" when --device auto


def _target_mpp(options: RunOptions) -> float:
    if options.target_mpp is not None and options.magnification is not None:
        raise ConfigError("give --target-mpp or --magnification, not both")
    if options.magnification is not None:
        if not (options.magnification > 0 and math.isfinite(options.magnification)):
            raise ConfigError(f"--magnification must be a positive number, got {options.magnification}")
        return MICRONS_AT_10X / options.magnification
    return DEFAULT_TARGET_MPP if options.target_mpp is None else options.target_mpp


def expected_checksums(path: Path, warn: Callable[[str], None]) -> dict[str, str]:
    """File name -> sha256 from a sha256sum-format file; slides are matched by file name, so one
    name listed with two different hashes is a ConfigError. Lines it skips go to ``warn``."""
    from gpupath.ingest import read_checksums

    entries, problems = read_checksums(path)
    for problem in problems:
        warn(f"{path}: {problem}")
    expected: dict[str, str] = {}
    for name, sha in entries.items():
        base = Path(name).name
        if expected.get(base, sha) != sha:
            raise ConfigError(f"--checksums {path}: {base} is listed twice with different hashes "
                              "(slides are matched by file name)")
        expected[base] = sha
    return expected


def plan_run(options: RunOptions, *, warn: Callable[[str], None] = lambda line: None) -> RunPlan:
    """Validate ``options`` and resolve them into a :class:`RunPlan`; ConfigError (one line) if unusable.
    ``warn`` gets each line of the checksum file that was skipped, as it is read."""
    target_mpp = _target_mpp(options)
    if options.out.exists() and not options.out.is_dir():
        raise ConfigError(f"--out {options.out}: exists and is not a folder")
    if options.workers is not None and options.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0: in this process), got {options.workers}")
    store = store_slides(options.store) if options.store is not None else None  # with their hashes at ingest
    slides = expand_inputs(list(options.slides), store=store)  # the store's slides last
    checksums = None if options.checksums is None else expected_checksums(options.checksums, warn)
    if not slides and not (store and store.refused):
        raise ConfigError("no slides given (paths, folders of slides, or --store DIR)")
    device = resolve_device(options.device)
    params = RunParams(
        tile=TileSpec(tile_px=options.tile, overlap_px=options.overlap, target_mpp=target_mpp,
                      min_tissue=options.min_tissue),
        stain=options.stain, device=device, backend=options.backend,  # type: ignore[arg-type]
        mpp_override=options.mpp, batch_size=options.batch_size, engine=options.engine,
        model=None if options.model is None else str(options.model),
        model_card=None if options.model_card is None else str(options.model_card),
        preprocess=options.preprocess, reports=options.reports, triton_url=options.triton_url,
        precision=options.precision,
    )
    note = None
    if options.device == "auto":
        note = f"device: {device}" + (" (no usable CUDA GPU found)" if device == "cpu" else "")
    return RunPlan(slides=slides, out=options.out, params=params, workers=options.workers,
                   scheduler=options.scheduler, resume=not options.redo, checksums=checksums, device_note=note,
                   stored=store.expected if store else {}, refused=store.refused if store else [])
