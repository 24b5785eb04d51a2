"""Per-slide summaries from a run folder's own files.

Reads ``run.json`` (parameters, environment, one :class:`~gpupath.pipeline.SlideResult` dict per
slide) and a slide's ``detections/slide_id=<id>/part-0.parquet``; returns plain dicts (written as
``summaries/<slide_id>.json``): counts per label, density per mm² of tissue, tissue area (mm²),
tiles, seconds per stage, the slide's metadata worth showing. Host only (pyarrow, NumPy).
Counts come from the Parquet table, not from run.json, so a summary says what the results hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpupath._version import __version__
from gpupath.errors import ConfigError
from gpupath.results import DETECTIONS_SCHEMA, check_schema_version, slide_part_paths

__all__ = ["SUMMARY_VERSION", "read_run", "read_detections", "label_counts", "slide_metadata", "slide_summary",
           "summary_path", "read_summary"]

SUMMARY_VERSION = "1"
# slide properties shown in reports (when present), in this order; vendor keys (aperio.*, ...) follow
_SHOWN_PROPERTIES = ("openslide.vendor", "openslide.objective-power", "openslide.mpp-x", "openslide.mpp-y",
                     "gpupath.backend", "tiff.Make", "tiff.Model", "tiff.Software", "tiff.DateTime",
                     "tiff.ImageDescription", "openslide.comment")
_SKIPPED_PREFIXES = ("openslide.", "tiff.", "gpupath.")
MAX_VENDOR_PROPERTIES = 40
MAX_PROPERTY_CHARS = 4000


def read_run(out: Path) -> dict[str, Any]:
    """``out/run.json`` as a dict.

    Raises
    ------
    ConfigError
        No run.json in ``out``, or it is not a run record.
    """
    path = Path(out) / "run.json"
    if not path.is_file():
        raise ConfigError(f"{out}: no run.json (not a gpupath run folder, or its run has not started)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable run record ({exc})") from None
    if not isinstance(run, dict) or not isinstance(run.get("slides"), list):
        raise ConfigError(f"{path}: not a gpupath run record (no 'slides' list)")
    return run


def read_detections(out: Path, slide_id: str) -> pa.Table:
    """A slide's detections: boxes, score, label (empty, with those columns, when its partition is missing).

    Raises
    ------
    ResultsError
        The partition is not gpupath's or of a schema major version this gpupath does not read.
    """
    path = slide_part_paths(Path(out), slide_id)["detections"]
    columns = ["x0_px", "y0_px", "x1_px", "y1_px", "score", "label"]
    if not path.is_file():
        return DETECTIONS_SCHEMA.empty_table().select(columns)
    with pq.ParquetFile(path) as pf:
        check_schema_version(path, pf.schema_arrow.metadata)
        return pf.read(columns=columns)


def label_counts(table: pa.Table, label_names: list[str] | None = None) -> tuple[dict[str, int], np.ndarray]:
    """Detections per label name, and each row's label index into the returned dict's keys.

    Every name of ``label_names`` (the detector's classes) appears, with 0 when absent; then any
    other label of the table, in dictionary order.

    Returns
    -------
    counts : label name -> number of rows.
    index : (N,) int64, position of each row's label in ``counts``.
    """
    names = list(label_names or [])
    col = table.column("label") if "label" in table.column_names else pa.chunked_array([], pa.string())
    index_parts = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            dictionary = chunk.dictionary.to_pylist()
            codes = chunk.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        else:  # a plain string column: its distinct values are the dictionary
            values = chunk.to_pylist()
            dictionary = sorted(set(values), key=values.index)
            codes = np.array([dictionary.index(v) for v in values], np.int64)
        for name in dictionary:
            if name not in names:
                names.append(name)
        remap = np.array([names.index(name) for name in dictionary] or [0], np.int64)
        index_parts.append(remap[codes] if len(codes) else codes)
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    counts = np.bincount(index, minlength=len(names)) if len(names) else np.zeros(0, np.int64)
    return {name: int(n) for name, n in zip(names, counts)}, index


def slide_metadata(properties: Mapping[str, str]) -> dict[str, str]:
    """The slide properties a report shows: vendor, objective, mpp, TIFF tags, the description,
    then up to MAX_VENDOR_PROPERTIES vendor keys (``aperio.*``, ``hamamatsu.*``, ...). Values are
    the slide's own free text (escape them when rendering), cut to MAX_PROPERTY_CHARS."""
    shown = {k: properties[k] for k in _SHOWN_PROPERTIES if k in properties}
    if "tiff.ImageDescription" in shown and shown.get("openslide.comment") == shown["tiff.ImageDescription"]:
        del shown["openslide.comment"]  # OpenSlide repeats the description as its comment
    vendor = sorted(k for k in properties if not k.startswith(_SKIPPED_PREFIXES))
    shown.update({k: properties[k] for k in vendor[:MAX_VENDOR_PROPERTIES]})
    if len(vendor) > MAX_VENDOR_PROPERTIES:
        shown["…"] = f"{len(vendor) - MAX_VENDOR_PROPERTIES} more vendor properties not shown"
    return {str(k): _cut(str(v)) for k, v in shown.items()}


def _cut(text: str) -> str:
    return text if len(text) <= MAX_PROPERTY_CHARS else text[:MAX_PROPERTY_CHARS] + f"… ({len(text)} characters)"


def slide_summary(result: Mapping[str, Any], detections: pa.Table, *, label_names: list[str] | None = None,
                  metadata: Mapping[str, str] | None = None, overlay: Mapping[str, Any] | None = None,
                  notes: list[str] | None = None) -> dict[str, Any]:
    """The summary of one processed slide (a JSON-ready dict).

    Parameters
    ----------
    result : the slide's SlideResult as a dict (as in run.json).
    detections : its detections table (:func:`read_detections`).
    label_names : the detector's classes (labels with no detection still get a 0 count).
    metadata : :func:`slide_metadata` of the slide (None: the slide file could not be read).
    overlay : how the overlay was drawn (path, mode, size, scale bar).
    notes : remarks about how the summary was made (e.g. a missing slide file).

    Returns
    -------
    dict with ``counts`` (label -> n), ``density_per_mm2`` (label -> n / tissue mm², None without
    tissue area), ``n_detections``, ``tissue_mm2``, ``n_tiles``, ``seconds``, ``timings_s``
    (stage -> s) and the slide's identity and geometry.
    """
    counts, _ = label_counts(detections, label_names)
    n = int(detections.num_rows)
    tissue_mm2 = result.get("tissue_mm2")
    has_area = isinstance(tissue_mm2, (int, float)) and tissue_mm2 > 0
    notes = list(notes or [])
    recorded = result.get("n_detections")
    if recorded is not None and recorded != n:
        notes.append(f"the detections table holds {n} rows; run.json records {recorded} "
                     "(results replaced since the run?)")
    path = str(result.get("path", ""))
    return {
        "summary_version": SUMMARY_VERSION, "gpupath_version": __version__,
        "slide_id": result.get("slide_id", ""), "path": path, "file_name": Path(path).name,
        "status": result.get("status", ""), "warning": result.get("warning", ""),
        "resumed": bool(result.get("resumed", False)),
        "vendor": result.get("vendor", ""), "backend": result.get("backend", ""),
        "width_px": result.get("width_px"), "height_px": result.get("height_px"),
        "level_count": result.get("level_count"), "mpp": result.get("mpp"), "tile_mpp": result.get("tile_mpp"),
        "tissue_mm2": tissue_mm2, "n_tiles": result.get("n_tiles", 0), "n_detections": n,
        "counts": counts,
        "density_per_mm2": {k: (v / tissue_mm2 if has_area else None) for k, v in counts.items()},
        "density_total_per_mm2": n / tissue_mm2 if has_area else None,
        "seconds": result.get("seconds"), "timings_s": dict(result.get("timings") or {}),
        "overlay": dict(overlay or {}), "slide_metadata": None if metadata is None else dict(metadata),
        "notes": notes,
    }


def summary_path(out: Path, slide_id: str) -> Path:
    """``out/summaries/<slide_id>.json``."""
    return Path(out) / "summaries" / f"{slide_id}.json"


def read_summary(out: Path, slide_id: str) -> dict[str, Any] | None:
    """A slide's summary written earlier, or None when missing or unreadable."""
    try:
        data = json.loads(summary_path(out, slide_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet (or half-gone): the caller shows what run.json has
        return None
    return data if isinstance(data, dict) else None
